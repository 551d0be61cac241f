"""Print what every Triton kernel and GEMM config compiles to on sm_80 and sm_90, no GPU needed:
registers, shared memory, spilled bytes and the tensor-core instruction.

    python -m nxm_kernels.backends.triton.inspect [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json

from . import aot

COLUMNS = ("kernel", "config", "arch", "registers", "shared", "spill_bytes", "tensor_core")


def table(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = [" | ".join(c.ljust(widths[c]) for c in COLUMNS), "-|-".join("-" * widths[c] for c in COLUMNS)]
    lines += [" | ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="parallel compiler processes")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = aot.compile_all(workers=args.workers)
    print(json.dumps(rows) if args.json else table(rows))


if __name__ == "__main__":
    main()
