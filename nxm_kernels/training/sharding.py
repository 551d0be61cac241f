"""Weights sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): the sparsifiers work on each
rank's shard, with no all-gather of weights.

Between optimizer steps an FSDP2 module's ``weight`` is a ``DTensor`` whose local tensor is a block
of whole rows (``Shard(0)``; ``Replicate`` on the other mesh dimensions under HSDP). A row pattern's
groups run along ``in_features``, so every group lies in one shard and the projection, the masks,
Z and U are computed per shard on the local tensor. A pattern with blocks of R > 1 rows (a
transposable 4x4, k:RxC) needs every shard edge on a multiple of R; otherwise it is refused. Only
norms (the residuals) are reduced across ranks, as scalars.

During the forward and backward passes FSDP2 swaps in the gathered (unsharded) weight; the
sparsifiers read and write ``module.weight`` between steps only, when it is the shard.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed support
    DTensor = None


def is_sharded(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own part of ``t`` (a view: writing it writes the parameter); ``t`` itself when
    it is not a DTensor."""
    return t.to_local() if is_sharded(t) else t


def like(part: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``part`` (the rank's shard) as a tensor sharded like ``weight``; ``part`` when unsharded."""
    if not is_sharded(weight):
        return part
    return DTensor.from_local(part, weight.device_mesh, weight.placements, shape=weight.shape,
                              stride=weight.stride(), run_check=False)


def check_shards(name: str, weight: torch.Tensor, pattern) -> None:
    """Refuse a sharded ``weight`` whose shards split the pattern's groups or blocks."""
    if not is_sharded(weight):
        return
    rows_per_block, cols = pattern.block
    shard_dims = [p for p in weight.placements if not isinstance(p, Replicate)]
    if any(not (isinstance(p, Shard) and p.dim == 0) for p in shard_dims) or len(shard_dims) > 1:
        raise ValueError(
            f"layer {name!r} is sharded as {weight.placements}: the sparsifiers need whole rows on each rank "
            f"(Shard(0), as fully_shard does by default) so that the {pattern} groups along in_features stay "
            "whole; do not pass a shard_placement_fn that shards another dimension"
        )
    if not shard_dims or rows_per_block == 1:
        return
    mesh_dim = list(weight.placements).index(shard_dims[0])
    ranks = weight.device_mesh.size(mesh_dim)
    rows = weight.shape[0]
    per_shard = -(-rows // ranks)  # torch.chunk's split: every shard but the last holds this many rows
    if per_shard % rows_per_block:
        raise ValueError(
            f"layer {name!r}: its {rows} rows sharded over {ranks} ranks give shards of {per_shard} rows, so "
            f"the {rows_per_block}x{cols} blocks of {pattern} would cross a shard edge; use a number of ranks "
            f"that gives shards of a multiple of {rows_per_block} rows, a row pattern (n:m), or leave the "
            "layer unsharded (exclude it, or fully_shard its parent without it)"
        )


def sq_norm(pairs) -> float:
    """sum ||t||^2 over ``(local tensor, its weight)`` pairs, over all ranks: each rank sums its own
    part, and the parts of a sharded weight are all-reduced over its shard group (scalars only)."""
    total = 0.0
    for t, weight in pairs:
        part = t.double().pow(2).sum()
        shard_dims = [i for i, p in enumerate(weight.placements) if isinstance(p, Shard)] if is_sharded(weight) else []
        if shard_dims:  # check_shards allows one
            torch.distributed.all_reduce(part, group=weight.device_mesh.get_group(shard_dims[0]))
        total += float(part)
    return total
