"""ADMM under torch.distributed DDP: 2 CPU processes with gloo, different data on each rank;
every rank must hold identical W, Z and U (and, after finalize, identical masks)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import nxm_kernels as nxm
from nxm_kernels.training import ADMMSparsifier, geometric_rho

WORLD = 2


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        admm = ADMMSparsifier(ddp, rho=1e-2, rho_schedule=geometric_rho(10, 12), update_every=3, exclude=("4",))
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
        g = torch.Generator().manual_seed(rank)  # each rank its own data
        x = torch.randn(64, 16, generator=g)
        y = torch.randint(0, 4, (64,), generator=g)
        for step in range(20):
            if step == 14:
                snapshot = {
                    "W": {n: m.weight.detach().clone() for n, m in admm.targets.items()},
                    "Z": {n: z.clone() for n, z in admm.Z.items()},
                    "U": {n: u.clone() for n, u in admm.U.items()},
                    "data": x.clone(),
                }
                admm.finalize()
            loss = F.cross_entropy(ddp(x), y) + admm.penalty()
            loss.backward()
            opt.step()
            opt.zero_grad()
            admm.step()
        snapshot["final"] = {n: m.weight.detach().clone() for n, m in admm.targets.items()}
        snapshot["masks"] = admm.masks
        snapshot["targets"] = list(admm.targets)
        torch.save(snapshot, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_hold_identical_w_z_u(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["targets"] == ["0", "2"]  # names of the model under DDP, not "module.0"
    assert not torch.equal(r0["data"], r1["data"])  # the ranks did see different data
    for key in ("W", "Z", "U", "final", "masks"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    for name, w in r0["final"].items():
        assert nxm.is_nm_sparse(w, "2:4") and torch.equal(w, w * r0["masks"][name])
    assert any(u.abs().sum() > 0 for u in r0["U"].values())  # the dual did move
