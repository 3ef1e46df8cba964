"""design.md §6: with ranks keeping different counts, the DDP step equals one step on the union
of kept examples with the loss summed and divided by the global kept count."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sampler.filter import LossShareFilter
from trainer.task import Task, cross_entropy
from trainer.train import train_step


def batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 6, generator=g)
    y = torch.randint(0, 3, (2, 32), generator=g)
    return x, y


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _rank(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    m = nn.parallel.DistributedDataParallel(model())
    task = Task(model=m, train=None, val=None)  # type: ignore[arg-type]
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: we only want the gradient

    def kept_total(k: int) -> int:
        t = torch.tensor([k])
        dist.all_reduce(t)
        return int(t)

    x, y = batches()
    filt = LossShareFilter(min_loss_perc=0.5 + 0.3 * rank)  # ranks keep different counts
    _, mask = train_step(task, m, opt, x[rank], y[rank], filt, kept_total)
    # numpy, not tensors: tensors travel as shared memory that dies with this process
    q.put((rank, mask.numpy(), [p.grad.numpy().copy() for p in m.parameters()]))
    dist.destroy_process_group()


def test_ddp_step_weighs_ranks_by_their_kept_counts():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, port, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = dict((r, (mask, grads)) for r, mask, grads in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
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
