"""Masks under DistributedDataParallel: two gloo processes on the CPU.

Each rank initialises its model with a different seed on purpose. Global magnitude pruning
broadcasts the weights from rank 0 before scoring, so both ranks compute the same global
threshold and the same masks (without that sync they differ); DDP training steps with
momentum then keep the masks, and the pruned weights at zero, on both ranks.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

WORKER = textwrap.dedent(
    """
    import copy
    import datetime
    import sys

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsecore import prune


    def main(rank, world, init_file, out):
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=90))
        try:
            torch.manual_seed(100 + rank)  # different weights on each rank
            model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                  nn.Linear(32, 4))
            unsynced = prune.get("magnitude", sync=False).prune(copy.deepcopy(model),
                                                                sparsity=0.8)
            masks = prune.prune(model, "magnitude", sparsity=0.8)
            ddp = DDP(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
            for _ in range(5):
                loss = ddp(torch.randn(16, 10)).pow(2).mean()  # each rank its own data
                opt.zero_grad()
                loss.backward()
                opt.step()
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            effective = {n: model.get_submodule(n[:-7]).weight.detach().clone() for n in masks}
            torch.save({"unsynced": unsynced, "masks": masks, "after": prune.masks(model),
                        "weights": weights, "effective": effective}, f"{out}/rank{rank}.pt")
            # both ranks done before either tears gloo down: a rank whose peer had already
            # closed the connection died in teardown (std::terminate) on a loaded machine
            dist.barrier()
        finally:
            dist.destroy_process_group()


    if __name__ == "__main__":
        torch.set_num_threads(1)
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    """
)


def test_ddp_two_ranks_identical_masks(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = tmp_path / "init"
    # Both ranks in subprocesses with a deadline: a rank that dies must fail the test, not
    # leave the other waiting in a collective inside the test process.
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(init),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    errs = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("a DDP rank did not finish in 240 s") from None
        errs.append(err)
    assert all(p.returncode == 0 for p in procs), errs
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert any(not torch.equal(r0["unsynced"][n], r1["unsynced"][n]) for n in r0["unsynced"])
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n])
        assert torch.equal(r0["after"][n], r0["masks"][n])
        assert torch.equal(r1["after"][n], r1["masks"][n])
        for r in (r0, r1):
            assert torch.all(r["effective"][n][~r["masks"][n]] == 0)
    total = sum(m.numel() for m in r0["masks"].values())
    assert sum(int(m.sum()) for m in r0["masks"].values()) == round(0.2 * total)
    for n in r0["weights"]:  # DDP kept the replicas in step
        torch.testing.assert_close(r0["weights"][n], r1["weights"][n])
