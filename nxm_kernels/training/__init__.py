"""Training N:M-sparse weights: ADMM (NxMTransformer) and the baselines it is measured against.

All three share one loop::

    sparsifier = ADMMSparsifier(model, "2:4", rho=1e-3, rho_schedule=geometric_rho(100, steps))
    for batch in data:
        loss = task_loss(model, batch) + sparsifier.penalty()
        loss.backward(); opt.step(); opt.zero_grad()
        sparsifier.step()
    sparsifier.finalize()        # W = project(W); masks fixed, held by the modules
    ...                          # masked fine-tuning: any loop, the pattern holds exactly
    nxm.sparsify(model)          # -> SparseLinear for exactly the trained (marked) layers
"""

from .admm import ADMMSparsifier, geometric_rho
from .baselines import MagnitudePruner, SRSTESparsifier
from .oneshot import PruneReport, prune
from .common import NMSparsifier, select_linears
from .search import SearchResult, search

__all__ = [
    "ADMMSparsifier",
    "MagnitudePruner",
    "NMSparsifier",
    "SRSTESparsifier",
    "PruneReport",
    "SearchResult",
    "geometric_rho",
    "prune",
    "search",
    "select_linears",
]
