"""The language-model localization benchmark: DEL's batched edits equal one edited copy at a
time, INJ trains only the chosen neurons' weights until the fresh canaries are extracted, recall
of an oracle is 1 and of random scores k/width, the runner resumes without duplicates, and bad
input is one line."""
import copy
import json
import math
import shutil

import pytest
import torch
from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot

from memkern.experiments.localize.channels import ChannelSpace, channel_space
from memkern.experiments.text.benchmark.drop import (EXPOSURE_CANDIDATES, EXPOSURE_SAMPLES,
                                                     drop_evaluate)
from memkern.experiments.text.benchmark.inject import fresh_canaries, inject, recall_at_k
from memkern.experiments.text.exposure import secret_exposure
from memkern.experiments.text.extraction import extracted, suffix_accuracy
from memkern.experiments.text.targets import sequence_targets
from memkern.network.sites import channel_sites
from memkern.rundir.context import open_run
from memkern.training.text_evaluate import window_nll

TINY = "gpt?layers=2&width=32&heads=2&mlp=64"


def _train_text_run(out, model: str, epochs: int):
    """A tiny text run of ``model``: 4 canaries (1 and 64 copies), a paragraph copied 32 times."""
    result = run_cli("train", "--dataset", "text:stdlib", "--model", model, "--canaries", "4",
                     "--canary-reps", "1,64", "--seq-len", "32", "--text-bytes", "8000",
                     "--epochs", str(epochs), "--lr", "0.3", "--batch-size", "32",
                     "--dup-paragraphs", "1", "--dup-reps", "32", "--out", out, "--no-progress",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory):
    """A tiny text run whose 64-copy canaries and paragraph are memorized (about 10 s)."""
    return _train_text_run(tmp_path_factory.mktemp("lm") / "run", TINY, epochs=10)


def _context(run):
    ctx = open_run(run, device="cpu", text_ok=True)
    model = ctx.model.double()
    return model, ctx.data, channel_space(model, list(channel_sites(model)))


def _reference_drop(scores, space, fraction):
    """The neurons DEL drops, by sorting each MLP site's scores in plain Python."""
    out = []
    for name, off, width in zip(space.names, space.offsets, space.counts):
        if name.endswith("mlp_hidden"):
            order = sorted(range(width), key=lambda j: -float(scores[off + j]))
            out += [(name, j) for j in order[:math.ceil(fraction * width)]]
    return out


def test_drop_batched_equals_one_zeroed_copy_at_a_time(lm_run):
    model, data, space = _context(lm_run)
    targets = sequence_targets(data.inserts, data)
    others = sequence_targets(data.canaries(), data)
    heldout = data.heldout_windows[:6]
    scores = torch.randn(len(targets), space.total, generator=torch.Generator().manual_seed(5))
    fractions = (0.02, 0.3)
    results = drop_evaluate(model, space, targets, scores, fractions=fractions, others=others,
                            heldout=heldout)
    assert [(r.target, r.fraction) for r in results] == [
        (i, f) for i in targets.ids for f in fractions]
    for r in results:
        t = targets.ids.index(r.target)
        dropped = _reference_drop(scores[t], space, r.fraction)
        assert r.neurons == len(dropped)
        edited = copy.deepcopy(model)
        with torch.no_grad():
            for site, j in dropped:
                edited.get_submodule(site.rsplit(".", 1)[0]).fc2.weight[:, j] = 0.0
        for m, measures in ((model, r.before), (edited, r.after)):
            row = targets.subset(torch.tensor([t]))
            with torch.no_grad():
                nll = float(row.secret_nll(m(row.inputs())))
            insert = data.inserts[t]
            prefix = torch.tensor(list(insert.prefix))
            secret = torch.tensor(list(insert.secret))
            keys = row.keys
            assert measures.nll == pytest.approx(nll, rel=1e-6, abs=1e-9)
            greedy = extracted(m, prefix[None], secret[None], keys=keys)
            assert measures.extracted == bool(greedy[0])
            acc = suffix_accuracy(m, torch.cat([prefix, secret])[None], len(prefix), keys=keys)
            assert measures.acc == pytest.approx(float(acc[0]))
            rest = [c for c in data.canaries() if c.id != insert.id]
            hits = extracted(m, torch.stack([torch.tensor(list(c.prefix)) for c in rest]),
                             torch.stack([torch.tensor(list(c.secret)) for c in rest]))
            assert measures.others == pytest.approx(float(hits.float().mean()))
            bpb = float(window_nll(m, heldout).mean()) / math.log(2)
            assert measures.bpb == pytest.approx(bpb, rel=1e-6)
            if insert.kind == "canary":
                e = secret_exposure(m, prefix, secret, key=int(keys[0]),
                                    max_candidates=EXPOSURE_CANDIDATES,
                                    samples=EXPOSURE_SAMPLES, seed=insert.id)
                assert measures.exposure == pytest.approx(e.exposure, rel=1e-6)
            else:
                assert math.isnan(measures.exposure)
    # the run memorized something and a large drop of its own top neurons costs it
    assert any(r.before.extracted for r in results)
    assert any(r.after.bpb > r.before.bpb for r in results)


def test_inject_trains_only_the_chosen_neurons_until_extracted(lm_run):
    model, data, space = _context(lm_run)
    model.float()
    fresh = fresh_canaries(2, seed=1, taken={c.prefix for c in data.canaries()},
                           first_key=10 ** 6)
    assert not {fresh.tokens[t, :20].numpy().tobytes() for t in range(2)} & {
        torch.tensor(list(c.prefix[:20])).numpy().tobytes() for c in data.canaries()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # where neuron j of each MLP layer sits in each parameter: row j of fc1 (and its bias),
    # column j of fc2
    neuron_axis = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}
    for t in range(len(fresh)):
        row = fresh.subset(torch.tensor([t]))
        inj = inject(model, space, row, fraction=0.25, seed=t)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert all(p.requires_grad for p in inj.model.parameters())  # as the model's
        assert inj.extracted and 0 < inj.steps < 1000
        assert int(inj.truth.sum()) == 2 * 16
        after = inj.model.state_dict()
        for k, v in before.items():
            kind = ".".join(k.rsplit(".", 2)[-2:])
            if kind in neuron_axis:
                i = space.names.index(k.rsplit(".", 2)[0] + ".mlp_hidden")
                mine = inj.truth[0, space.offsets[i]:space.offsets[i] + space.counts[i]]
                diff = after[k] != v
                changed = diff.any(1 - neuron_axis[kind]) if diff.ndim == 2 else diff
                assert changed.any() and not (changed & ~mine).any(), k
            else:
                assert torch.equal(after[k], v), k
        pos = torch.nonzero(row.scored[0]).flatten()
        prompt = row.tokens[:, :int(pos[0]) + 1]
        secret = row.tokens[:, int(pos[0]) + 1:int(pos[-1]) + 2]
        assert extracted(inj.model, prompt, secret, keys=row.keys)[0]  # greedy decoding
        assert not extracted(model, prompt, secret, keys=row.keys)[0]


def test_recall_of_an_oracle_is_one_and_of_random_scores_k_over_width():
    space = ChannelSpace(("blocks.0.attn.heads", "blocks.0.mlp_hidden", "blocks.1.mlp_hidden"),
                         (2, 64, 40))
    gen = torch.Generator().manual_seed(11)
    rows, ks = 3000, {"blocks.0.mlp_hidden": 7, "blocks.1.mlp_hidden": 4}
    truth = torch.zeros(rows, space.total, dtype=torch.bool)
    for name, k in ks.items():
        i = space.names.index(name)
        for r in range(rows):
            truth[r, space.offsets[i] + torch.randperm(space.counts[i], generator=gen)[:k]] = True
    oracle = truth.float() + 0.5 * torch.rand(rows, space.total, generator=gen)
    assert torch.equal(recall_at_k(oracle, truth, space), torch.ones(rows))
    chance = sum(k * k / 64 if "0." in n else k * k / 40 for n, k in ks.items()) / sum(ks.values())
    random = recall_at_k(torch.randn(rows, space.total, generator=gen), truth, space)
    assert float(random.mean()) == pytest.approx(chance, abs=0.01)
    # by hand: planted {0, 1} of a 4-wide site; scores rank 0, 2, 1, 3: one of two found
    small = ChannelSpace(("b.mlp_hidden",), (4,))
    got = recall_at_k(torch.tensor([[4.0, 2.0, 3.0, 1.0]]), torch.tensor([[1, 1, 0, 0]]).bool(),
                      small)
    assert got.tolist() == [0.5]


def _random_rank(model, space, targets, clean, *, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(targets.ids))
    return torch.rand(len(targets), space.total, generator=gen)


def _fc2_norm_rank(model, space, targets, clean, *, seed=0):
    """The same ranking for every target: each MLP neuron's output-weight norm (heads: 0)."""
    parts = [model.get_submodule(n.rsplit(".", 1)[0]).fc2.weight.norm(dim=0)
             if n.endswith("mlp_hidden") else torch.zeros(c)
             for n, c in zip(space.names, space.counts)]
    return torch.cat(parts)[None].expand(len(targets), -1).detach()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _key(line):
    return line["kind"], line["method"], line["target"], line.get("fraction")


ARGS = ("--fractions", "1,50", "--injections", "1", "--no-progress", "--device", "cpu")


def test_runner_resumes_after_a_kill_without_duplicates_or_loss(lm_run, tmp_path, monkeypatch):
    from memkern.experiments.text.benchmark import run as bench

    calls = []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fc2_norm_rank(*args, **kwargs)

    monkeypatch.setattr(bench, "CHUNK", 1)
    first, whole = tmp_path / "first", tmp_path / "whole"
    shutil.copytree(lm_run, first)
    shutil.copytree(lm_run, whole)
    monkeypatch.setattr(bench, "registry", lambda: {"random": _random_rank, "norm": killed})
    result = run_cli("benchmark-lm", "--run", first, *ARGS)
    assert result.exit_code == 130, result.output
    out = first / "lm_benchmark.jsonl"
    kept = out.read_text()
    assert [_key(x)[:2] for x in _lines(out)] == [("del", "random")] * 3 + [("del", "norm")]
    assert not (first / "lm_benchmark.csv").exists()
    monkeypatch.setattr(bench, "registry", lambda: {"random": _random_rank, "norm": _fc2_norm_rank})
    assert run_cli("benchmark-lm", "--run", first, *ARGS).exit_code == 0
    assert run_cli("benchmark-lm", "--run", whole, *ARGS).exit_code == 0
    resumed, straight = _lines(out), _lines(whole / "lm_benchmark.jsonl")
    assert out.read_text().startswith(kept)
    assert len({_key(x) for x in resumed}) == len(resumed) == 2 * 3 + 2 * 2
    timeless = lambda rows: {_key(x): {k: v for k, v in x.items() if k != "rank_s"} for x in rows}
    assert timeless(resumed) == timeless(straight)
    table = (first / "lm_benchmark.csv").read_text().splitlines()
    assert table[0].startswith("benchmark,method,fraction_pct") and len(table) == 1 + 4 + 4
    assert (first / "lm_benchmark.md").read_text().startswith("# memkern language-model")
    assert b"memkern" in (first / "lm_benchmark.png").read_bytes()[:4096]
    # a rerun with everything done computes nothing and appends nothing
    monkeypatch.setattr(bench, "registry", lambda: {"random": killed, "norm": killed})
    calls.clear()
    again = run_cli("benchmark-lm", "--run", first, "--methods", "random", *ARGS)
    assert again.exit_code == 0 and not calls and _lines(out) == resumed
    # the report shows the comparison: both tables and the figure
    assert run_cli("report", "--run", first).exit_code == 0
    page = (first / "report" / "index.html").read_text()
    assert "DEL: drop each method" in page and "INJ: recall" in page
    assert "forgotten against damage per method" in page


@pytest.fixture(scope="session")
def plain_text_run(tmp_path_factory):
    """A one-epoch text run without canaries."""
    out = tmp_path_factory.mktemp("lm0") / "run"
    result = run_cli("train", "--dataset", "text:stdlib", "--model", TINY, "--seq-len", "32",
                     "--text-bytes", "8000", "--canaries", "0", "--epochs", "1", "--out", out,
                     "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("args, fragment", [
    (("--methods", "random,nope"), "unknown method(s) nope"),
    (("--fractions", "0"), "(0, 100]"),
    (("--fractions", "0.5,150"), "150"),
    (("--fractions", "half"), "percentages"),
    (("--limit", "0"), "--limit"),
    (("--out", "table.csv"), ".jsonl"),
    (("--foreign-table",), "not a memkern benchmark table"),
    (("--settings-run",), "other settings"),
    (("--image-run",), "text run"),
    (("--plain-run",), "without canaries"),
])
def test_bad_input_is_one_line_and_writes_nothing(lm_run, plain_text_run, run, tmp_path,
                                                  monkeypatch, args, fragment):
    from memkern.experiments.text.benchmark import run as bench

    monkeypatch.setattr(bench, "registry", lambda: {"random": _random_rank})
    target = tmp_path / "lm"
    shutil.copytree(lm_run, target)
    if args == ("--image-run",):
        target, args = run, ()
    elif args == ("--plain-run",):
        target, args = plain_text_run, ()
    elif args == ("--foreign-table",):
        (target / "lm_benchmark.md").write_text("# my notes\n")
        args = ()
    elif args == ("--settings-run",):
        assert run_cli("benchmark-lm", "--run", target, "--no-inject", *ARGS).exit_code == 0
        args = ("--fractions", "2")
    before = snapshot(target)
    result = run_cli("benchmark-lm", "--run", target, "--no-progress", "--device", "cpu", *args)
    assert_one_line_error(result, fragment)
    assert_unchanged(before, target)
    assert sorted(snapshot(target)) == sorted(before)


def test_table_aggregates_lines_by_method_and_fraction():
    from memkern.experiments.text.benchmark.table import benchmark_table, markdown

    def drop(fraction, ext_before, ext_after, others_after, bpb_after, acc_after=0.5):
        return {"fraction": fraction, "extracted_before": ext_before,
                "extracted_after": ext_after, "others_before": 1.0, "others_after": others_after,
                "bpb_before": 2.0, "bpb_after": bpb_after, "exposure_before": 20.0,
                "exposure_after": 5.0, "acc_before": 1.0, "acc_after": acc_after}

    lines = [
        {"kind": "del", "method": "m", "target": 0, "target_kind": "canary", "rank_s": 1.0,
         "drops": [drop(0.01, True, False, 0.5, 2.5)]},
        {"kind": "del", "method": "m", "target": 1, "target_kind": "canary", "rank_s": 3.0,
         "drops": [drop(0.01, True, True, 1.0, 2.0)]},
        {"kind": "del", "method": "m", "target": 2, "target_kind": "canary", "rank_s": 2.0,
         "drops": [drop(0.01, False, False, 1.0, 2.0)]},
        {"kind": "del", "method": "m", "target": 3, "target_kind": "paragraph", "rank_s": 2.0,
         "drops": [drop(0.01, False, False, None, 2.0, acc_after=0.25)]},
        {"kind": "inj", "method": "m", "target": 0, "fraction": 0.01, "recall": 0.5,
         "chance": 0.01, "extracted": True, "rank_s": 1.0},
        {"kind": "inj", "method": "m", "target": 1, "fraction": 0.01, "recall": 1.0,
         "chance": 0.01, "extracted": False, "rank_s": 3.0},
    ]
    dele, inj = benchmark_table(lines, ["m"])
    assert dele["targets"] == 4 and dele["fraction_pct"] == pytest.approx(1.0)
    assert dele["efficacy"] == 0.5 and dele["memorization_change_pct"] == -50.0
    assert dele["others_change_pts"] == pytest.approx(-50 / 3)  # undefined for one: left out
    assert dele["ppl_change_pct"] == pytest.approx(100 * (2 ** 0.5 - 1) / 4)
    assert dele["exposure_change"] == -15.0 and dele["suffix_acc_change_pts"] == -75.0
    assert dele["rank_s"] == 2.0
    assert inj["recall"] == 0.75 and inj["reached"] == "1/2" and inj["rank_s"] == 2.0
    text = markdown([dele, inj], run="r")
    assert "| m | 1 | 4 | 0.50 | -50.0% | -16.7 | +10.36% | -15.0 | -75.0 | 2.00 |" in text


HF_TINY = "hf:gpt2?n_layer=2&n_embd=32&n_head=2&n_inner=64"


@pytest.fixture(scope="session")
def hf_lm_run(tmp_path_factory):
    """A tiny hf:gpt2 text run with canaries and a duplicated paragraph."""
    pytest.importorskip("transformers")
    return _train_text_run(tmp_path_factory.mktemp("hflm") / "run", HF_TINY, epochs=1)


def test_inject_on_hf_trains_only_the_chosen_neurons_weights(hf_lm_run):
    """hf:gpt2's Conv1D stores its weight [in, out]: neuron j's input weights are column j of
    c_fc (and its bias entry j), its output weights row j of c_proj."""
    model, data, space = _context(hf_lm_run)
    fresh = fresh_canaries(1, seed=1, taken={c.prefix for c in data.canaries()},
                           first_key=10 ** 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inj = inject(model, space, fresh, fraction=0.25, seed=0, max_steps=5)
    assert inj.steps >= 1 and int(inj.truth.sum()) == 2 * 16
    after = inj.model.state_dict()
    neuron_axis = {"c_fc.weight": 1, "c_fc.bias": 0, "c_proj.weight": 0}
    for k, v in before.items():
        kind = ".".join(k.rsplit(".", 2)[-2:])
        if ".mlp." in k and kind in neuron_axis:
            i = space.names.index(k.rsplit(".", 2)[0] + ".hidden")
            mine = inj.truth[0, space.offsets[i]:space.offsets[i] + space.counts[i]]
            diff = after[k] != v
            changed = diff.any(1 - neuron_axis[kind]) if diff.ndim == 2 else diff
            assert changed.any() and not (changed & ~mine).any(), k
        else:
            assert torch.equal(after[k], v), k


def test_every_method_runs_del_and_inj_on_an_hf_run(hf_lm_run, tmp_path):
    out = tmp_path / "bench.jsonl"
    result = run_cli("benchmark-lm", "--run", hf_lm_run, "--limit", "2", "--fractions", "1,50",
                     "--injections", "1", "--out", out, "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    from memkern.experiments.text.methods import METHODS

    lines = _lines(out)
    for method in METHODS:
        dels = [x for x in lines if x["kind"] == "del" and x["method"] == method]
        injs = [x for x in lines if x["kind"] == "inj" and x["method"] == method]
        assert 1 <= len(dels) <= 2 and len(injs) == 2, method
        assert all(len(x["drops"]) == 2 for x in dels), method
        assert all(0 <= x["recall"] <= 1 for x in injs), method
    assert (tmp_path / "bench.csv").exists() and (tmp_path / "bench.md").exists()
