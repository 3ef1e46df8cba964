"""design.md §6, through the public worker API: with ranks keeping different counts, the DDP
step equals one step on the union of kept examples with the loss summed and divided by the
global kept count; a NaN on one rank stops every rank at the same step."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hardbatch.trainer.task import cross_entropy
from torch import nn
from torch.utils.data import TensorDataset

from hardbatch import Worker, WorkerConfig


def batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 6, generator=g)
    y = torch.randint(0, 3, (2, 32), generator=g)
    return x, y


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _join(rank: int, port: int, poison: bool):
    """This rank in a 2-process gloo group: the DDP model and the two ranks' data."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x, y = batches()
    if poison:
        x[1, 3] = float("nan")  # one NaN loss on rank 1 only
    return nn.parallel.DistributedDataParallel(model()), x, y


def _rank(rank: int, port: int, q, poison: bool = False) -> None:
    m, x, y = _join(rank, port, poison)
    # ranks keep different counts
    config = WorkerConfig(min_loss_perc=0.5 + 0.3 * rank, score_precision="fp32",
                          cost_model=False, filter_gate=False)  # the filter on the first step
    hb = Worker(config, TensorDataset(x[rank], y[rank]), batch_size=32)
    assert (hb.rank, hb.world_size) == (rank, 2)
    ids = torch.arange(32)
    try:
        keep = hb.select(ids, lambda: cross_entropy(m(x[rank]), y[rank]))
    except ValueError as e:
        q.put((rank, "raised", str(e)))
        dist.destroy_process_group()
        return
    hb.loss(cross_entropy(m(x[rank][keep]), y[rank][keep])).backward()
    mask = torch.zeros(32, dtype=torch.bool)
    mask[keep] = True
    # numpy, not tensors: tensors travel as shared memory that dies with this process
    q.put((rank, mask.numpy(), [p.grad.numpy().copy() for p in m.parameters()]))
    hb.close()
    dist.destroy_process_group()


def _rank_full_steps(rank: int, port: int, q, poison: bool = False) -> None:
    """Two epochs with the gate on: its first steps are full (nothing scored before them)."""
    m, x, y = _join(rank, port, poison=True)
    hb = Worker(WorkerConfig(score_precision="fp32"), TensorDataset(x[rank], y[rank]),
                batch_size=8)
    for epoch in (0, 1):
        for ids, (xb, yb) in hb.batches(epoch):
            try:
                keep = hb.select(ids, lambda xb=xb, yb=yb: cross_entropy(m(xb), yb))
            except ValueError as e:
                q.put((rank, "raised", (hb.step, str(e))))
                dist.destroy_process_group()
                return
            assert keep == slice(None)
            hb.loss(cross_entropy(m(xb[keep]), yb[keep])).backward()
    q.put((rank, "trained", None))
    dist.destroy_process_group()


def _run_ranks(poison: bool = False, target=_rank) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=target, args=(r, port, q, poison)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = {r: (a, b) for r, a, b in (q.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return out


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step():
    out = _run_ranks(poison=True)
    assert out[0][0] == out[1][0] == "raised"  # neither waits for the other in a collective
    assert "NaN or inf" in out[1][1] and "other rank" in out[0][1]


def test_a_nan_on_a_full_step_stops_every_rank_at_the_next_select():
    out = _run_ranks(target=_rank_full_steps)
    assert out[0][0] == out[1][0] == "raised"
    (step0, msg0), (step1, msg1) = out[0][1], out[1][1]
    assert step0 == step1 and "NaN or inf" in msg0 and "1 rank" in msg1


def test_ddp_step_weighs_ranks_by_their_kept_counts():
    out = _run_ranks()
    masks = [torch.from_numpy(out[0][0]), torch.from_numpy(out[1][0])]
    assert int(masks[0].sum()) != int(masks[1].sum())

    x, y = batches()
    ref = model()
    xs = torch.cat([x[r][masks[r]] for r in (0, 1)])
    ys = torch.cat([y[r][masks[r]] for r in (0, 1)])
    loss = cross_entropy(ref(xs), ys).sum() / len(ys)
    loss.backward()
    for got0, got1, want in zip(out[0][1], out[1][1], [p.grad for p in ref.parameters()],
                                strict=True):
        torch.testing.assert_close(torch.from_numpy(got0), want)
        torch.testing.assert_close(torch.from_numpy(got1), want)
