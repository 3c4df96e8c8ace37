"""Localization on a real (tiny) digits run: batched == one at a time, EoT, exhaustive,
edited accuracies, resume after a kill, clear errors."""
import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memkern.rundir.atomic import append_jsonl, read_jsonl
from memkern.training.config import TrainConfig
from memkern.errors import CheckpointError, ConfigError
from memkern.training.evaluate import predictions, split_accuracies
from memkern.rundir.context import load_trained
from memkern.experiments.localize import (LocalizationObjective, channel_space, exhaustive_localize,
                              greedy_localize, localize, naive_ablation_scan, reference_indices,
                              summarize)
from memkern.experiments.localize.channels import row_masks, set_masks
from memkern.experiments.localize.edited import edited_accuracies
from memkern.experiments.localize.objective import EOT_NOISE, eot_copies
from memkern.experiments.localize.paper_loop import paper_localize, site_filters
from memkern.experiments.localize.exact_argmin import bounded_argmin
from memkern.experiments.localize.run import recover_jsonl
from memkern.experiments.localize.scan import ablation_scan
from memkern.experiments.localize.summary import format_table
from memkern.training.train import train

MEMKERN = [str(Path(sys.executable).parent / "memkern")]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loc") / "run"
    train(TrainConfig(epochs=5), out=out, progress=False, device="cpu")
    return out


@pytest.fixture(scope="session")
def ckpt(run_dir):
    return run_dir / "checkpoints" / "epoch_005.safetensors"


@pytest.fixture(scope="session")
def trained64(ckpt):
    t = load_trained(ckpt, device="cpu")
    t.model.double()
    return t


def _objective(data, *, eot=0, refs=24, dtype=torch.float64):
    return LocalizationObjective(data.train_images.to(dtype), data.train_labels,
                                 reference_indices(len(data.train_labels), refs, seed=1),
                                 eot=eot, seed=3)


def _fitted(trained, noisy: bool, k: int) -> torch.Tensor:
    """k training examples of the group whose label the unedited model predicts."""
    data = trained.data
    right = predictions(trained.model, data.train_images.double()) == data.train_labels
    return torch.nonzero(right & (data.noisy_mask == noisy)).flatten()[:k]


def _targets(trained):
    """Noisy and clean examples the model fits, and one noisy one it does not (flips at 0)."""
    data = trained.data
    right = predictions(trained.model, data.train_images.double()) == data.train_labels
    wrong = torch.nonzero(~right).flatten()[:1]
    return torch.cat([_fitted(trained, True, 2), _fitted(trained, False, 2), wrong])


@pytest.mark.parametrize("eot", [0, 2])
def test_batched_greedy_equals_one_at_a_time(trained64, eot):
    model, data = trained64.model, trained64.data
    space = channel_space(model)
    obj = _objective(data, eot=eot)
    targets = _targets(trained64)
    # the reference batch contains one of the targets: its own row must be left out
    obj.ref = torch.cat([obj.ref[~torch.isin(obj.ref, targets)], targets[:1]]).sort().values
    batched = greedy_localize(model, obj, targets, space=space, max_channels=6,
                              max_rows=2 * obj.rows_per_target)  # groups of 2 targets
    for r in batched:
        (single,) = greedy_localize(model, obj, torch.tensor([r.index]), space=space,
                                    max_channels=6)
        assert (r.channels, r.flipped) == (single.channels, single.flipped), r.index
        assert torch.equal(r.zeroed, single.zeroed)
        torch.testing.assert_close(torch.tensor(r.trace), torch.tensor(single.trace),
                                   rtol=1e-9, atol=1e-9)
        assert len(r.trace) == len(r.channels) + 1
        assert r.flipped or len(r.channels) == 6
    assert batched[-1].flipped and batched[-1].channels == []  # not fitted: flipped at once
    assert any(r.flipped and r.channels for r in batched)


def test_greedy_picks_the_papers_channels(trained64):
    """The core claim on a trained model: greedy's mask gradient ranks channels as the paper's
    sum over each filter of w * dL/dw, so both zero the same channels in the same order."""
    model, data = trained64.model, trained64.data
    space = channel_space(model)
    obj = _objective(data)
    targets = torch.cat([_fitted(trained64, True, 4), _fitted(trained64, False, 2)])
    before = copy.deepcopy(model.state_dict())
    paper = paper_localize(model, obj, targets, space=space, max_channels=8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    batched = greedy_localize(model, obj, targets, space=space, max_channels=8)
    for r, p in zip(batched, paper, strict=True):
        assert (r.index, r.channels, r.flipped) == (p.index, p.channels, p.flipped), r.index
        torch.testing.assert_close(torch.tensor(r.trace), torch.tensor(p.trace),
                                   rtol=1e-9, atol=1e-9)
    assert sum(len(r.channels) for r in batched) >= len(targets)  # channels were compared
    assert any(r.flipped for r in batched) and len({s for r in batched for s, _ in r.channels}) > 1
    assert site_filters(model, space) == ["block1.conv.weight", "block2.conv.weight",
                                          "block3.conv.weight", "hidden.linear.weight"]


def test_greedy_stop_rule_and_trace(trained64):
    """A flipped target's edited model predicts another class; its trace starts at the unedited
    objective."""
    model, data = trained64.model, trained64.data
    space = channel_space(model)
    obj = _objective(data)
    (r,) = greedy_localize(model, obj, _fitted(trained64, True, 1), space=space, max_channels=30)
    assert r.channels
    x = obj.inputs(torch.tensor([r.index])).double()
    with row_masks(model, space) as ops:
        for zeroed, want_flip in ((torch.zeros_like(r.zeroed), False), (r.zeroed, r.flipped)):
            set_masks(ops, space, (~zeroed).double().expand(len(x), -1))
            with torch.no_grad():
                loss, clean = obj(model(x)[None], torch.tensor([r.index]))
            assert (int(clean.argmax()) != int(data.train_labels[r.index])) == want_flip
        set_masks(ops, space, torch.ones(len(x), space.total, dtype=torch.float64))
        with torch.no_grad():
            loss, _ = obj(model(x)[None], torch.tensor([r.index]))
    assert abs(float(loss) - r.trace[0]) < 1e-12


@pytest.mark.parametrize("eot", [0, 3])
def test_objective_equals_its_definition(eot):
    """L_t = mean CE over the references other than t - CE_t (EoT: CE of the mean logits of the
    copies), computed row by row in float64, against the split form greedy uses."""
    gen = torch.Generator().manual_seed(4)
    n, k = 40, 5
    labels = torch.randint(0, k, (n,), generator=gen)
    ref = torch.tensor([2, 5, 11, 17, 30])
    obj = LocalizationObjective(torch.zeros(n, 1, 2, 2), labels, ref, eot=eot)
    targets = torch.tensor([5, 9, 30])  # two of them are references
    logits = torch.randn(len(targets), obj.rows_per_target, k, generator=gen, dtype=torch.float64)
    for j, t in enumerate(targets.tolist()):  # a target's reference row is its clean row
        if t in ref:
            logits[j, obj.target_rows + ref.tolist().index(t)] = logits[j, 0]
    got, clean = obj(logits, targets)
    for j, t in enumerate(targets.tolist()):
        own = logits[j, 1:1 + eot].mean(0) if eot else logits[j, 0]
        ce = torch.nn.functional.cross_entropy
        others = [ce(logits[j, obj.target_rows + r], labels[i]) for r, i in enumerate(ref.tolist())
                  if i != t]
        want = torch.stack(others).mean() - ce(own, labels[t])
        assert abs(float(got[j] - want)) < 1e-12
        assert torch.equal(clean[j], logits[j, 0])


def test_batched_greedy_shares_the_reference_rows(trained64):
    """Targets with the same mask share one reference pass: the batched run pushes fewer rows
    through the model than the same targets one at a time, with the same results."""
    model, data = trained64.model, trained64.data
    space = channel_space(model)
    obj = _objective(data)
    targets = _fitted(trained64, True, 3)
    rows = []
    hook = model.register_forward_pre_hook(lambda mod, args: rows.append(len(args[0])))
    try:
        batched = greedy_localize(model, obj, targets, space=space, max_channels=4)
        batched_rows = sum(rows)
        rows.clear()
        single = [greedy_localize(model, obj, t[None], space=space, max_channels=4)[0]
                  for t in targets]
    finally:
        hook.remove()
    assert [r.channels for r in batched] == [r.channels for r in single]
    ref = len(obj.ref)
    # step 0 alone: one reference pass instead of one per target
    assert batched_rows <= sum(rows) - (len(targets) - 1) * ref


def test_eot_copies_deterministic_and_scaled():
    x = torch.randn(3, 1, 8, 8)
    idx = torch.tensor([5, 9, 700])
    a, b = eot_copies(x, idx, 4, seed=7), eot_copies(x, idx, 4, seed=7)
    assert a.shape == (3, 4, 1, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, eot_copies(x, idx, 4, seed=8))
    # a target's copies depend on its own index only, not on the batch around it
    assert torch.equal(a[1], eot_copies(x[1:2], idx[1:2], 4, seed=7)[0])
    ratio = (a - x[:, None]).flatten(2).norm(dim=2) / x.flatten(1).norm(dim=1)[:, None]
    torch.testing.assert_close(ratio, torch.full_like(ratio, EOT_NOISE), rtol=1e-5, atol=0)


def test_exhaustive_takes_the_best_exact_channel(trained64):
    model, data = trained64.model, trained64.data
    space = channel_space(model)
    obj = _objective(data, refs=8)
    t = _fitted(trained64, True, 1)
    (r,) = exhaustive_localize(model, obj, t, space=space, max_channels=2, candidates=12)
    x = obj.inputs(t).double()
    on = torch.ones(space.total, dtype=torch.bool)
    for k, (site, c) in enumerate(r.channels):
        chosen = space.flat(site, c)
        values = naive_ablation_scan(model, x, lambda lg: obj(lg, t.expand(len(lg)))[0],
                                     sites=space, base_mask=on.double(), candidates=[chosen])
        assert abs(r.trace[k + 1] - float(values[chosen])) < 1e-9
        on[chosen] = False
    assert len(r.trace) == len(r.channels) + 1


def test_exhaustive_all_candidates_is_global_argmin(trained64):
    model, data = trained64.model, trained64.data
    space = channel_space(model)
    obj = _objective(data, refs=4)
    t = _fitted(trained64, True, 2)[1:]
    (r,) = exhaustive_localize(model, obj, t, space=space, max_channels=1)
    x = obj.inputs(t).double()
    values = naive_ablation_scan(model, x, lambda lg: obj(lg, t.expand(len(lg)))[0], sites=space)
    assert space.flat(*r.channels[0]) == int(values.argmin())


def test_edited_accuracies_match_one_model_at_a_time(trained64):
    model, data = trained64.model, trained64.data
    space = channel_space(model)
    gen = torch.Generator().manual_seed(0)
    zeroed = torch.rand(3, space.total, generator=gen) < torch.tensor([[0.0], [0.05], [0.3]])
    got = edited_accuracies(model, data, space, zeroed, max_rows=1000)
    data64 = type(data)(**{**data.__dict__, "train_images": data.train_images.double(),
                           "test_images": data.test_images.double()})
    for z, g in zip(zeroed, got):
        # Reference: the paper's edit itself, the zeroed filters' weights set to 0 in a copy.
        edited = copy.deepcopy(model)
        for site, off in space.split(z[None]).items():
            block = edited.get_submodule(site.rsplit(".", 1)[0])
            layer = block.conv if hasattr(block, "conv") else block.linear
            layer.weight.data[off[0]] = 0
        want = split_accuracies(edited, data64)
        assert g == pytest.approx(want, abs=1e-7)


def test_recover_jsonl_removes_torn_line(tmp_path):
    path = tmp_path / "l.jsonl"
    append_jsonl(path, {"index": 1})
    with open(path, "a") as f:
        f.write('{"index": 2, "chan')
    assert [r["index"] for r in recover_jsonl(path)] == [1]
    append_jsonl(path, {"index": 3})
    assert [r["index"] for r in read_jsonl(path)] == [1, 3]
    assert path.read_text().count("\n") == 2


def test_localize_writes_lines_summary_and_figure(ckpt, run_dir):
    result = localize(ckpt=ckpt, examples="all", limit=6, ref_batch=32, max_channels=20,
                      chunk=4, device="cpu", progress=False)
    assert result.path == run_dir / "localize.jsonl"
    rows = read_jsonl(result.path)
    assert len(rows) == 6 and sum(r["noisy"] for r in rows) == 3
    for r in rows:
        assert set(r) >= {"index", "noisy", "flipped", "channels", "n_channels", "trace",
                          "clean_acc", "noisy_acc", "test_acc"}
        assert r["n_channels"] == len(r["channels"]) == len(r["trace"]) - 1
    assert (run_dir / "localize.png").stat().st_size > 1000
    saved = json.loads((run_dir / "localize.summary.json").read_text())
    assert saved["groups"]["noisy"]["count"] == 3
    assert "share of zeroed channels" in format_table(summarize(rows))
    # rerun: nothing left to do, no duplicate lines
    localize(ckpt=ckpt, examples="all", limit=6, ref_batch=32, max_channels=20, device="cpu",
             progress=False)
    assert len(read_jsonl(result.path)) == 6


def test_resume_after_kill(ckpt, tmp_path):
    out = tmp_path / "l.jsonl"
    cmd = MEMKERN + ["localize", "--ckpt", str(ckpt), "--examples", "all", "--limit", "12",
                     "--chunk", "2", "--ref-batch", "32", "--max-channels", "10",
                     "--out", str(out), "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "localize finished before it could be killed"
    before = len(read_jsonl(out))
    assert 1 <= before < 12
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line parses
    indices = [r["index"] for r in rows]
    assert len(indices) == len(set(indices)) == 12


def test_summary_site_enrichment():
    """Share of zeroed channels per site over the site's share of all channels."""
    rows = [{"noisy": True, "flipped": True, "n_channels": 2, "channels": [["a", 0], ["b", 1]],
             "clean_acc": 1.0, "noisy_acc": 0.5, "test_acc": 0.9},
            {"noisy": False, "flipped": False, "n_channels": 1, "channels": [["b", 3]],
             "clean_acc": 1.0, "noisy_acc": 1.0, "test_acc": 0.9}]
    s = summarize(rows, site_order=["a", "b"], site_widths={"a": 10, "b": 30})
    assert s["groups"]["noisy"]["site_fraction"] == {"a": 0.5, "b": 0.5}
    assert s["groups"]["noisy"]["site_enrichment"] == pytest.approx({"a": 2.0, "b": 2 / 3})
    assert s["groups"]["clean"]["site_enrichment"] == pytest.approx({"a": 0.0, "b": 4 / 3})
    assert "30 ch" in format_table(s)


def test_resume_with_other_settings_is_refused(ckpt, tmp_path):
    """Lines computed with another reference batch are not mixed with new ones: one line, exit
    2, the output untouched; the same options resume."""
    out = tmp_path / "l.jsonl"
    opts = ["--ckpt", ckpt, "--examples", "all", "--limit", "2", "--max-channels", "3",
            "--out", out, "--no-progress", "--device", "cpu"]
    assert _cli(*opts, "--ref-batch", "8").returncode == 0
    before = out.read_text()
    assert read_jsonl(out)[0]["settings"]["ref_batch"] == 8
    res = _cli(*opts, "--ref-batch", "16", "--limit", "3")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "ref_batch: 8 there, 16 now" in res.stderr, res.stderr
    assert out.read_text() == before
    assert _cli(*opts, "--ref-batch", "8", "--limit", "3").returncode == 0
    assert len(read_jsonl(out)) == 3


def _cli(*args):
    return subprocess.run(MEMKERN + ["localize", *map(str, args)], capture_output=True, text=True)


def test_foreign_or_unbuildable_checkpoint_is_exit_2(ckpt, tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    meta = {"format": "memkern-checkpoint", "version": "1", "epoch": "1",
            "config": TrainConfig().to_json()}
    save_file({"model.nothing": torch.zeros(3)}, str(wrong), metadata=meta)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    for path, words in ((wrong, "does not fit"), (foreign, "not a memkern checkpoint"),
                        (tmp_path / "missing.safetensors", "does not exist")):
        res = _cli("--ckpt", path, "--no-progress", "--out", tmp_path / "o.jsonl")
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and words in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(CheckpointError):
        localize(ckpt=wrong, progress=False)


@pytest.mark.parametrize("content,words", [("1 2 99999", "out of range"), ("4, x7", "'x7'"),
                                           ("3\n3", "more than once"), ("", "no indices")])
def test_bad_examples_file(ckpt, tmp_path, content, words):
    f = tmp_path / "idx.txt"
    f.write_text(content)
    res = _cli("--ckpt", ckpt, "--examples", f, "--no-progress", "--out", tmp_path / "o.jsonl")
    assert res.returncode == 2 and words in res.stderr, res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_examples_file_and_unknown_site(ckpt, tmp_path):
    f = tmp_path / "idx.txt"
    f.write_text("7, 3\n11")
    out = tmp_path / "o.jsonl"
    res = _cli("--ckpt", ckpt, "--examples", f, "--no-progress", "--out", out, "--ref-batch", 16,
               "--sites", "block2.pre,hidden.pre", "--max-channels", 3, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out)
    assert sorted(r["index"] for r in rows) == [3, 7, 11]
    assert all(s in ("block2.pre", "hidden.pre") for r in rows for s, _ in r["channels"])
    with pytest.raises(ConfigError, match="unknown site"):
        localize(ckpt=ckpt, sites=["nope"], progress=False)


def test_summary_counts_unfitted_targets_apart():
    """A target predicted otherwise before any zeroing is not 'flipped with 0 channels'."""
    acc = {"clean_acc": 1.0, "noisy_acc": 0.5, "test_acc": 0.9}
    rows = [{"index": 0, "noisy": True, "flipped": True, "n_channels": 0, "channels": [], **acc},
            {"index": 1, "noisy": True, "flipped": True, "n_channels": 4,
             "channels": [["a", i] for i in range(4)], **acc},
            {"index": 2, "noisy": True, "flipped": False, "n_channels": 6,
             "channels": [["a", i] for i in range(6)], **acc}]
    e = summarize(rows, site_order=["a"])["groups"]["noisy"]
    assert (e["count"], e["unfitted"], e["flip_rate"]) == (3, 1, 0.5)
    assert e["median_channels_flipped"] == 4 and e["n_channels"] == [4, 6]


def test_checkpoint_kept_outside_checkpoints_gets_its_output_beside_it(ckpt, tmp_path):
    moved = tmp_path / "elsewhere" / "model.safetensors"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    result = _cli("--ckpt", moved, "--examples", "noisy", "--limit", "1", "--max-channels", "2",
                  "--ref-batch", "8", "--no-progress", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (moved.parent / "localize.jsonl").is_file()
    assert not (tmp_path / "localize.jsonl").exists()


@pytest.mark.parametrize("eot", [0, 2])
@pytest.mark.parametrize("refs", ["fitted", "drawn"])
def test_bounded_argmin_is_the_full_scans_argmin(trained64, eot, refs):
    """Steps of exhaustive localization: the bounded argmin picks the channel the full scan's
    argmin picks, with its value, over all channels still on or a random subset; targets
    noisy, clean, misfit and one that is its own reference row. References the model fits
    well (as a fully trained model fits its training set) leave most candidates pruned by the
    target's rows alone; references drawn at random (this 5-epoch model still errs on some)
    take the second bound, from the references with the largest loss."""
    model, data = trained64.model, trained64.data
    space = channel_space(model)
    targets = _targets(trained64)
    if refs == "fitted":
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(data.train_images.double()),
                                                     data.train_labels, reduction="none")
        ref = loss.argsort()[:24]
    else:
        ref = reference_indices(len(data.train_labels), 48, seed=1)
    obj = LocalizationObjective(data.train_images.double(), data.train_labels,
                                torch.cat([ref, targets[:1]]).unique(), eot=eot, seed=3)
    assert bool(obj.in_ref(targets[:1])[0])
    gen = torch.Generator().manual_seed(eot)
    evaluated = scanned = heavy = 0
    for t in targets:
        x, ids = obj.inputs(t[None]), obj.ids(t[None])
        on = torch.ones(space.total, dtype=torch.bool)
        for step in range(3):
            pool = torch.nonzero(on).flatten()
            if step == 2:
                pool = pool[torch.randperm(len(pool), generator=gen)[:12]]
            values = ablation_scan(model, x, lambda lg: obj(lg, t.expand(len(lg)))[0],
                                   sites=space, base_mask=on, candidates=pool, ids=ids).values
            got = bounded_argmin(model, obj, t, x, ids, space=space, base_mask=on,
                                 candidates=pool)
            assert got.channel == int(pool[values[pool].argmin()])
            assert abs(got.value - float(values[pool].min())) < 1e-12
            evaluated, scanned = evaluated + got.evaluated, scanned + len(pool)
            heavy += got.heavy
            on[got.channel] = False
    if refs == "fitted":
        assert evaluated < scanned / 4, (evaluated, scanned)
    else:
        assert heavy > 0


@pytest.mark.parametrize("eot", [0, 3])
def test_the_target_part_bounds_the_objective_from_below(eot):
    """What the bounded argmin's pruning rests on: for any logits, the objective's target part
    is at most the objective (the reference part is a mean of cross-entropies)."""
    gen = torch.Generator().manual_seed(eot)
    labels = torch.randint(0, 10, (40,), generator=gen)
    ref = torch.arange(5, 25)
    obj = LocalizationObjective(torch.zeros(40, 1, 2, 2, dtype=torch.float64), labels, ref,
                                eot=eot)
    targets = torch.tensor([0, 7, 30, 24])  # two of them reference rows
    for scale in (0.1, 3.0, 30.0):
        logits = scale * torch.randn(len(targets), obj.rows_per_target, 10, generator=gen,
                                     dtype=torch.float64)
        value, _ = obj(logits, targets)
        part, _ = obj.target_terms(logits[:, :obj.target_rows], targets)
        assert (part <= value).all()
