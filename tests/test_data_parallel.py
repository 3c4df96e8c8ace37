"""memkern.training.data_parallel on its own: 2 gloo processes (spawned here) train a conv-BatchNorm net
on the two slices of an 11-row batch (6 + 5 rows) through DistributedDataParallel; the loss
gradients, BatchNorm running statistics and outputs equal one process on the whole batch.
A smooth activation (tanh) keeps float noise from switching a ReLU or max-pool branch."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from memkern.training.data_parallel import replicated, shard, step_loss
from memkern.training.distributed import World

ROWS = 11


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Tanh(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 16, bias=False), nn.BatchNorm1d(16),
                         nn.Tanh(), nn.Linear(16, 4))


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(ROWS, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (ROWS,),
                                                                         generator=g)


def _rank(rank: int, size: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    world = World(rank=rank, size=size)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = shard(ROWS, world)
    with replicated(model, world) as replica:
        for step in range(2):
            x, y = _batch(step)
            opt.zero_grad()
            logits = replica(x[rows])
            loss, _ = step_loss(logits, y[rows], global_rows=ROWS, world=world)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
        model.eval()
        torch.save({"grads": grads, "state": model.state_dict(), "eval": model(_batch(5)[0])},
                   f"{out}.rank{rank}")
        del replica
    dist.destroy_process_group()


def test_batch_norm_over_ranks_equals_one_process(tmp_path):
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path / "r")), nprocs=2)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    model.eval()
    want = {"grads": grads, "state": model.state_dict(), "eval": model(_batch(5)[0])}
    ranks = [torch.load(tmp_path / f"r.rank{r}") for r in (0, 1)]
    for got in ranks:
        for part in ("grads", "state"):
            assert sorted(got[part]) == sorted(want[part])
            for k in want[part]:
                torch.testing.assert_close(got[part][k], want[part][k], rtol=1e-5, atol=1e-6,
                                           msg=f"{part} {k}")
        torch.testing.assert_close(got["eval"], want["eval"], rtol=1e-5, atol=1e-6)
    assert int(ranks[0]["state"]["1.num_batches_tracked"]) == 2


def test_shards_cover_the_batch_in_order():
    for rows, size in ((11, 2), (64, 3), (5, 5)):
        parts = [shard(rows, World(rank=r, size=size)) for r in range(size)]
        assert [i for p in parts for i in range(rows)[p]] == list(range(rows))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
