// The kept indices of one row of the packed layout (the LSB-first bitstream compress_packed_chunk in
// nm_core.h writes), decoded once into input columns for the portable CPU GEMMs.
#pragma once

#include <cstdint>

#include "nm_core.h"

namespace nxm {

// Kept value s of the row lies at input column columns[s] = (s / n) * m + its index. An index
// outside its group (possible only in unchecked corrupt metadata) gives valid[s] = 0 and the
// group's first column, so that a caller contributes nothing and never reads outside x.
inline void packed_row_columns(const uint8_t* meta, int64_t kept, int n, int m, int64_t* columns, uint8_t* valid) {
  const int bits = index_bits(m);
  const uint32_t index_mask = (1u << bits) - 1u;
  uint32_t pending = 0;
  int pending_bits = 0;
  for (int64_t s = 0; s < kept; ++s) {
    while (pending_bits < bits) {
      pending |= uint32_t(*meta++) << pending_bits;
      pending_bits += 8;
    }
    const uint32_t index = pending & index_mask;
    pending >>= bits;
    pending_bits -= bits;
    valid[s] = index < uint32_t(m);
    columns[s] = s / n * m + (valid[s] ? index : 0);
  }
}

}  // namespace nxm
