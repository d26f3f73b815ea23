"""SupCon under DDP is the loss of the global batch: two gloo processes on the CPU against one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from delg.train.losses import supcon_loss

WORLD = 2
T = 0.1


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """Fixed inputs (12, 6) of 5 classes and a linear "model" 6 -> 4.  The rows are split 7 / 5 between the ranks
    (unequal, as after a skipped image), and class 3's two rows sit on different ranks: a rank-local loss loses
    that pair (no positive on either rank) and sees half the negatives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 1])
    model = torch.nn.Linear(6, 4)
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 6, generator=g))
        model.bias.copy_(torch.randn(4, generator=g))
    return x, labels, model


SPLIT = 7  # rank 0: rows 0..6 (class 3's first row is row 6), rank 1: rows 7..11


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, labels, model = _data()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        net = DistributedDataParallel(model)  # averages the gradients over the ranks, as in training
        res = {}
        for gather in (True, False):  # False: each rank's loss over its own rows only (the old behaviour)
            model.zero_grad(set_to_none=True)
            loss = supcon_loss(net(x[rows]), labels[rows], T, gather=gather)
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # the trainer logs the mean over ranks
            res[gather] = {"loss": mean_loss / WORLD, "weight": model.weight.grad.clone(),
                           "bias": model.bias.grad.clone()}
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_supcon_ddp_equals_one_process_over_the_global_batch(tmp_path: Path) -> None:
    x, labels, model = _data()
    ref = supcon_loss(model(x), labels, T)
    ref.backward()

    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    res = torch.load(out, weights_only=True)
    got = res[True]
    torch.testing.assert_close(got["loss"], ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["weight"], model.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["bias"], model.bias.grad, atol=1e-5, rtol=1e-5)

    # A rank-local loss (the old behaviour) is another loss, with other gradients.
    local = res[False]
    assert not torch.allclose(local["loss"], ref.detach(), atol=1e-3)
    assert not torch.allclose(local["weight"], model.weight.grad, atol=1e-3)
