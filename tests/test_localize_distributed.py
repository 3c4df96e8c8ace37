"""``memkern localize`` under torchrun (2 ranks, gloo on CPU) on a real tiny digits run: the
merged output equals a one-process run, leftovers of a killed run are merged once, bad input
fails before any rank joins, a missing rank times out instead of hanging."""
import json
import socket
import time

import pytest
import torch

from memkern.rundir.atomic import append_jsonl, read_jsonl
from memkern.training.distributed import World
from memkern.errors import CheckpointError, ConfigError, DistributedError
from memkern.experiments.localize import localize
from memkern.experiments.localize.run import merge_parts, part_files, part_path
from torchrun_launch import torchrun

OPTS = dict(examples="all", limit=10, chunk=2, ref_batch=32, max_channels=8)


def _cli_opts(**kw):
    return [a for k, v in {**OPTS, **kw}.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return tiny_run / "checkpoints" / "epoch_003.safetensors"


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """The lines of a one-process run, in output order."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    localize(ckpt=ckpt, out=out, device="cpu", progress=False, **OPTS)
    rows = read_jsonl(out)
    assert len(rows) == OPTS["limit"] and any(r["channels"] for r in rows)
    return rows


def _torchrun(ckpt, out, nproc=2):
    return torchrun(["localize", "--ckpt", ckpt, "--out", out, "--device", "cpu",
                     "--no-progress", *_cli_opts()], nproc=nproc)


def _assert_same_lines(got, want):
    assert [r["index"] for r in got] == [r["index"] for r in want]
    for g, w in zip(got, want):
        assert (g["channels"], g["flipped"], g["n_channels"]) == \
            (w["channels"], w["flipped"], w["n_channels"]), g["index"]
        torch.testing.assert_close(torch.tensor(g["trace"]), torch.tensor(w["trace"]),
                                   rtol=1e-5, atol=1e-6)


def test_two_ranks_equal_one_process(ckpt, reference, tmp_path):
    out = tmp_path / "l.jsonl"
    started = time.perf_counter()
    res = _torchrun(ckpt, out)
    print(f"torchrun 2 ranks: {time.perf_counter() - started:.1f} s")
    assert res.returncode == 0, res.stderr
    _assert_same_lines(read_jsonl(out), reference)
    assert part_files(out) == []
    summary = json.loads((tmp_path / "l.summary.json").read_text())
    assert summary["examples"] == OPTS["limit"]
    assert (tmp_path / "l.png").stat().st_size > 1000
    assert res.stdout.count("share of zeroed channels") == 1  # rank 0 alone prints the table


def _leave_behind(out, reference):
    """What a killed 3-rank run leaves: two lines in the output, part files holding complete
    lines (one marked, one duplicating an output line) and torn last lines."""
    rows = [dict(r) for r in reference]
    rows[2]["from_part"] = True  # shows the merged line is the part's, not recomputed
    for r in rows[:2]:
        append_jsonl(out, r)
    parts = {0: [rows[2], rows[5]], 1: [rows[3], rows[0]], 2: [rows[4]]}
    for rank, lines in parts.items():
        for r in lines:
            append_jsonl(part_path(out, rank, 3), r)
        if rank != 1:
            with open(part_path(out, rank, 3), "a") as f:
                f.write('{"index": 99, "chan')
    return rows


def test_rerun_with_two_ranks_merges_a_killed_runs_parts(ckpt, reference, tmp_path):
    out = tmp_path / "l.jsonl"
    _leave_behind(out, reference)
    res = _torchrun(ckpt, out)
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out)
    assert len(out.read_text().splitlines()) == len(rows)  # no torn line left
    _assert_same_lines(rows, reference)  # each index once, in target order
    assert [r["index"] for r in rows if r.get("from_part")] == [reference[2]["index"]]
    assert part_files(out) == []


def test_one_process_merges_parts_and_writes_none(ckpt, reference, tmp_path):
    out = tmp_path / "l.jsonl"
    _leave_behind(out, reference)
    localize(ckpt=ckpt, out=out, device="cpu", progress=False, **OPTS)
    _assert_same_lines(read_jsonl(out), reference)
    assert part_files(out) == []


def test_merge_parts_order_duplicates_and_a_kill_before_removal(tmp_path):
    out = tmp_path / "o.jsonl"
    append_jsonl(out, {"index": 7, "v": "out"})
    append_jsonl(part_path(out, 1, 2), {"index": 7, "v": "part"})
    append_jsonl(part_path(out, 1, 2), {"index": 3, "v": "part1"})
    append_jsonl(part_path(out, 0, 2), {"index": 5, "v": "part0"})
    append_jsonl(part_path(out, 0, 2), {"index": 40, "v": "elsewhere"})
    append_jsonl(part_path(out, 0, 2), {"index": 3, "v": "part0"})
    (tmp_path / "o.jsonl.rank0-of-2.tmp").write_text("not a part")
    kept = {p: p.read_text() for p in part_files(out)}
    assert len(kept) == 2
    want = [(7, "out"), (5, "part0"), (3, "part0"), (40, "elsewhere")]
    assert [(r["index"], r["v"]) for r in merge_parts(out, [9, 5, 7, 3])] == want
    assert part_files(out) == [] and (tmp_path / "o.jsonl.rank0-of-2.tmp").exists()
    for p, text in kept.items():  # killed after the output was replaced, before the removal
        p.write_text(text)
    assert [(r["index"], r["v"]) for r in merge_parts(out, [9, 5, 7, 3])] == want
    assert [(r["index"], r["v"]) for r in read_jsonl(out)] == want


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lone_rank(monkeypatch):
    """This process as one rank of two whose peer never starts; joining would time out in 3 s."""
    def become(rank):
        for k, v in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                     "MEMKERN_DIST_TIMEOUT": "3"}.items():
            monkeypatch.setenv(k, v)
    return become


@pytest.mark.parametrize("rank", [0, 1])
def test_bad_input_fails_on_each_rank_before_joining(ckpt, tmp_path, lone_rank, rank):
    lone_rank(rank)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="does not exist"):
        localize(ckpt=tmp_path / "missing.safetensors", progress=False)
    with pytest.raises(ConfigError, match="--chunk"):
        localize(ckpt=ckpt, chunk=0, progress=False)
    assert time.perf_counter() - started < 3  # no join was attempted
    assert list(tmp_path.iterdir()) == []


def test_a_missing_rank_times_out(ckpt, tmp_path, lone_rank):
    lone_rank(0)
    started = time.perf_counter()
    with pytest.raises(DistributedError, match="could not join .* within MEMKERN_DIST_TIMEOUT=3"):
        localize(ckpt=ckpt, out=tmp_path / "l.jsonl", device="cpu", progress=False, **OPTS)
    assert time.perf_counter() - started < 30
    assert read_jsonl(tmp_path / "l.jsonl") == []


@pytest.mark.parametrize("env,words", [({"WORLD_SIZE": "2"}, "RANK=None"),
                                       ({"WORLD_SIZE": "2", "RANK": "2"}, "not in 0..1"),
                                       ({"WORLD_SIZE": "two"}, "not an integer")])
def test_bad_launch_environment(monkeypatch, env, words):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=words):
        World.from_env()


def test_world_of_one_without_launcher(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    world = World.from_env()
    assert (world.rank, world.size, world.main, world.sum(5)) == (0, 1, True, 5)
    assert world.place(torch.device("cuda")) == torch.device("cuda")
    assert World(rank=1, size=2, local_rank=1).place(torch.device("cuda")) == \
        torch.device("cuda", 1)
