"""8 threads call SparseLinear forward and nxm.sparse_mm at once, with mixed dtypes, shapes and
layouts, on layers they share and layers each has alone, all starting with cold caches (the
backend form of each layer, the dispatch choices): every result equals, bit for bit, what one
thread computes alone."""

import copy
import random
import threading

import torch
from torch import nn

import nxm_kernels as nxm
from nxm_kernels.nn import SparseLinear

THREADS = 8
ROUNDS = 3
# (in_features, out_features, pattern): a shape that needs no padding and two that do.
SHAPES = ((64, 64, "2:4"), (40, 24, "2:4"), (64, 10, "1:4"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_layers() -> list[SparseLinear]:
    torch.manual_seed(0)
    return [
        SparseLinear.from_dense(nn.Linear(n_in, n_out).to(dtype), pattern)
        for n_in, n_out, pattern in SHAPES
        for dtype in DTYPES
    ]


def make_weights() -> list[nxm.NMSparseWeight]:
    torch.manual_seed(1)
    weights = []
    for dtype in DTYPES:
        w = torch.randn(64, 64).to(dtype)
        weights.append(nxm.compress(w, "2:4", layout="packed"))
        weights.append(nxm.compress(w, "2:4" if dtype != torch.float32 else "1:2", layout="cutlass"))
    return weights


def calls(layers, weights) -> list:
    """Every call as a zero-argument function, inputs fixed: forwards (batch 1 and 7, and a 3-d
    input) and sparse_mm on each compressed weight, with and without bias."""
    def inputs(n_in, dtype, seed):
        generator = torch.Generator().manual_seed(seed)
        return [torch.randn(*shape, n_in, generator=generator).to(dtype) for shape in ((1,), (7,), (2, 3))]

    work = []
    for i, layer in enumerate(layers):
        for x in inputs(layer.in_features, layer.values.dtype, i):
            work.append(lambda layer=layer, x=x: layer(x))
    for i, sw in enumerate(weights):
        bias = torch.randn(sw.shape[0], generator=torch.Generator().manual_seed(100 + i)).to(sw.dtype)
        for x in inputs(sw.shape[1], sw.dtype, 100 + i):
            work.append(lambda sw=sw, x=x: nxm.sparse_mm(x, sw))
            work.append(lambda sw=sw, x=x, bias=bias: nxm.sparse_mm(x, sw, bias))
    return work


def run_in_threads(per_thread_work: list[list]) -> list[list[torch.Tensor]]:
    """Each thread runs its own list of calls ROUNDS times in its own shuffled order, after all
    threads are ready; results come back in the lists' order (one list of rounds per call)."""
    start = threading.Barrier(len(per_thread_work))
    results = [[[] for _ in work] for work in per_thread_work]
    errors = []

    def worker(index):
        try:
            order = list(range(len(per_thread_work[index])))
            rng = random.Random(index)
            start.wait()
            for _ in range(ROUNDS):
                rng.shuffle(order)
                for i in order:
                    with torch.no_grad():
                        results[index][i].append(per_thread_work[index][i]())
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(per_thread_work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_eight_threads_get_the_single_threaded_results_bit_for_bit():
    shared_layers, weights = make_layers(), make_weights()
    # Cold copies for the threads, taken before anything ran: the half of the threads with even
    # numbers share one set of layers, each odd-numbered thread has its own.
    copies = [copy.deepcopy(shared_layers) for _ in range(THREADS // 2 + 1)]
    per_thread = [
        calls(copies[0] if t % 2 == 0 else copies[1 + t // 2], weights) for t in range(THREADS)
    ]
    with torch.no_grad():
        expected = [f() for f in calls(shared_layers, weights)]

    results = run_in_threads(per_thread)
    mismatches = [
        (t, i)
        for t in range(THREADS)
        for i, rounds in enumerate(results[t])
        for got in rounds
        if not (got.dtype == expected[i].dtype and torch.equal(got.view(torch.uint8), expected[i].view(torch.uint8)))
    ]
    assert mismatches == []
    assert len(expected) == len(SHAPES) * len(DTYPES) * 3 + 2 * len(DTYPES) * 3 * 2
