"""The sparsifiers under FSDP2 (``fully_shard``): 2 CPU processes with gloo, each Linear sharded
by rows, each rank its half of the batch. Every method, quantization-aware ones too, must end
where the single-process run on the whole batch ends (W, Z, U, masks, Adam's moments), computing
on its own shards only; a pattern whose blocks would cross a shard edge is refused."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import nxm_kernels as nxm
from nxm_kernels.training import ADMMSparsifier, MagnitudePruner, SRSTESparsifier

WORLD = 2
STEPS, FINALIZE = 16, 11
SCENARIOS = {
    "admm-loss": lambda m: ADMMSparsifier(m, "2:4", rho=0.05, update_every=3, exclude=("4",)),
    "admm-proximal-2:4t": lambda m: ADMMSparsifier(m, "2:4t", rho=0.2, update_every=4, penalty="proximal",
                                                   exclude=("4",)),
    "srste": lambda m: SRSTESparsifier(m, "2:4", exclude=("4",)),
    "magnitude": lambda m: MagnitudePruner(m, "2:4", exclude=("4",)),
    # quantization-aware: per-row and per-group scales lie within a row, so within a shard
    "admm-loss-int4": lambda m: ADMMSparsifier(m, "2:4", rho=0.05, update_every=3, weight_bits=4, group_size=16,
                                               exclude=("4",)),
    "magnitude-int8": lambda m: MagnitudePruner(m, "2:4", weight_bits=8, exclude=("4",)),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4)).double()


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()


@contextlib.contextmanager
def _no_weight_gathers():
    """Inside: any all-gather of a tensor or DTensor fails (only scalar all-reduces may run)."""
    from torch.distributed.tensor import DTensor

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was gathered")

    saved = [(dist, "all_gather_into_tensor"), (dist, "all_gather"), (DTensor, "full_tensor"),
             (DTensor, "redistribute")]
    originals = [getattr(owner, name) for owner, name in saved]
    for owner, name in saved:
        setattr(owner, name, refuse)
    try:
        yield
    finally:
        for (owner, name), original in zip(saved, originals):
            setattr(owner, name, original)


def _run(make, model, x, y, add_penalty_grad):
    """The training loop of every scenario; returns what the ranks are compared on."""
    sparsifier = make(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    snapshot = {}
    for step in range(1, STEPS + 1):
        loss = F.cross_entropy(model(x), y)
        if not add_penalty_grad:
            loss = loss + sparsifier.penalty()
        loss.backward()
        if add_penalty_grad and hasattr(sparsifier, "add_penalty_grad"):
            sparsifier.add_penalty_grad()
        opt.step()
        opt.zero_grad()
        with _no_weight_gathers() if add_penalty_grad else contextlib.nullcontext():
            sparsifier.step()
            if step == FINALIZE - 1:
                snapshot["residual"] = sparsifier.residual()["primal"]
                snapshot["Z"] = {n: z.clone() for n, z in getattr(sparsifier, "Z", {}).items()}
                snapshot["U"] = {n: u.clone() for n, u in getattr(sparsifier, "U", {}).items()}
            if step == FINALIZE:
                sparsifier.finalize()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    snapshot["W"] = {n: local(m.weight.detach()).clone() for n, m in sparsifier.targets.items()}
    snapshot["masks"] = {n: m.clone() for n, m in sparsifier.masks.items()}
    # Adam's moments: the masked gradient (a pre-step hook under FSDP2, a gradient hook without) stops them
    snapshot["exp_avg"] = {n: local(opt.state[m.weight]["exp_avg"]).clone() for n, m in sparsifier.targets.items()}
    return snapshot


def _worker(rank, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        half = slice(rank * 32, (rank + 1) * 32)
        results = {}
        for name, make in SCENARIOS.items():
            model = _model()
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
            if name == "admm-loss":
                with pytest.raises(RuntimeError, match="add_penalty_grad"):
                    make(model).penalty()
            results[name] = _run(make, model, x[half], y[half], add_penalty_grad=True)
            if rank == 0:
                results[name]["reference"] = _run(make, _model(), x, y, add_penalty_grad=False)
        crossing = nn.Sequential(nn.Linear(16, 36), nn.Linear(36, 4)).double()  # 18 rows a shard
        fully_shard(crossing[0])
        try:
            ADMMSparsifier(crossing, "8:4x4", exclude=("1",))
            results["refusal"] = ""
        except ValueError as e:
            results["refusal"] = str(e)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_match_the_single_process_run(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # The runs differ only in float64 rounding (the batch's gradient summed in two halves): about
    # 1e-16 per operation, a few hundred operations per weight; one AdamW step moves a weight 1e-2.
    tol = 1e-10
    for name in SCENARIOS:
        reference = ranks[0][name]["reference"]
        for key in ("W", "Z", "U", "masks", "exp_avg"):
            for layer, full in reference[key].items():
                shards = [r[name][key][layer] for r in ranks]
                assert all(s.shape[0] == full.shape[0] // WORLD for s in shards), (name, key, layer)
                sharded = torch.cat(shards)
                if key == "masks":
                    assert torch.equal(sharded, full), (name, layer)
                else:
                    assert torch.allclose(sharded, full, rtol=0, atol=tol), (name, key, layer)
        for layer, w in reference["W"].items():
            assert nxm.is_nm_sparse(w, SCENARIOS[name](_model()).pattern), (name, layer)
        assert ranks[0][name]["residual"] == pytest.approx(reference["residual"], rel=1e-9, abs=1e-12)
        assert ranks[1][name]["residual"] == ranks[0][name]["residual"]  # reduced over the ranks
    assert any(u.abs().sum() > 0 for u in ranks[0]["admm-loss"]["U"].values())  # the dual did move
    for r in ranks:
        assert "18 rows" in r["refusal"] and "cross a shard edge" in r["refusal"], r["refusal"]
