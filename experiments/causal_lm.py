"""Runs the causal-LM experiment into experiments/results/causal_lm.json (and causal_lm.md).

    python experiments/causal_lm.py --threads 1       # all methods; rerun to finish missing rows
    python experiments/causal_lm.py --quick --out /tmp/smoke.json

Everything but the output path lives in :mod:`nxm_kernels.causal_lm`; see its ``--help``.
"""

import shlex
import sys
from pathlib import Path

from nxm_kernels.causal_lm import main

if __name__ == "__main__":
    main(default_out=Path(__file__).resolve().parent / "results" / "causal_lm.json",
         command=shlex.join(["python", "experiments/causal_lm.py"] + sys.argv[1:]))
