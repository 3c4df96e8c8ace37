"""Localizing memorized sequences: the text objective equals its definition, greedy batched
equals one target at a time, the zeroed neurons are exactly what a weight edit removes, and the
edit's measures equal those of a model whose weights were edited; the CLI end to end."""
import json
import math

import pytest
import torch
from cli_checks import assert_one_line_error, run_cli
from test_text_data import write_works

from memkern.data.text import load_text_data
from memkern.experiments.localize.channels import channel_space
from memkern.experiments.localize.exhaustive import exhaustive_localize
from memkern.experiments.localize.greedy import greedy_localize
from memkern.experiments.text.edits import edit_measures
from memkern.experiments.text.exposure import sequence_log_probs
from memkern.experiments.text.extraction import extracted, greedy_continuations
from memkern.experiments.text.objective import TextObjective, clean_reference
from memkern.experiments.text.targets import SequenceTargets, sequence_targets
from memkern.network.models import build_text_model
from memkern.training.text_evaluate import window_nll

SPEC = "gpt?layers=2&width=32&heads=2&mlp=48"
SEQ = 24


def peaked_model(seed, context=SEQ):
    torch.manual_seed(seed)
    m = build_text_model(SPEC, vocab=256, context=context).double().eval()
    with torch.no_grad():
        m.head.weight.mul_(8.0)
    return m


def own_secrets(model, count, seed, prefix=6, secret=5):
    """Targets the model has "memorized": each secret is its own greedy continuation."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(32, 127, (count, prefix), generator=gen)
    secrets = greedy_continuations(model, prompts, secret)
    tokens = torch.cat([prompts, secrets], 1)
    scored = torch.zeros(count, prefix + secret - 1, dtype=torch.bool)
    scored[:, prefix - 1:] = True
    return SequenceTargets(tokens, scored, torch.arange(1000, 1000 + count),
                           tuple(range(count))), prompts, secrets


def windows(seed, count):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, SEQ + 1), generator=gen, dtype=torch.uint8)


def without_neurons(model, zeroed, space):
    """A copy of ``model`` whose zeroed MLP neurons are removed from its weights."""
    edited = build_text_model(SPEC, vocab=256, context=model.context).double().eval()
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        for flat in torch.nonzero(zeroed).flatten().tolist():
            site, c = space.locate(flat)
            block = edited.blocks[int(site.split(".")[1])]
            block.fc2.weight[:, c] = 0.0
    return edited


def test_objective_is_clean_nll_minus_the_secrets_nll():
    model = peaked_model(0)
    targets, prompts, secrets = own_secrets(model, 3, seed=1)
    w = windows(2, 10)
    ref = torch.tensor([1, 4, 7])
    objective = TextObjective(targets, w, ref)
    t = torch.tensor([2, 0])
    with torch.no_grad():
        loss, clean = objective(model(objective.inputs(t)).unflatten(0, (2, 4)), t)
    clean_nll = window_nll(model, w[ref]).double().mean()
    for k, i in enumerate(t.tolist()):
        secret_lp = sequence_log_probs(model, prompts[i], secrets[i][None])[0]
        assert float(loss[k]) == pytest.approx(float(clean_nll) + secret_lp, rel=1e-5)
    assert not objective.flipped(clean, t).any()  # each secret is the model's own continuation


def test_greedy_batched_equals_one_at_a_time_and_flips_what_decoding_loses():
    model = peaked_model(3)
    targets, prompts, secrets = own_secrets(model, 4, seed=4)
    objective = TextObjective(targets, windows(5, 12), torch.tensor([0, 3, 5, 8, 11]))
    space = channel_space(model, ["blocks.0.mlp_hidden", "blocks.1.mlp_hidden"])
    ids = torch.arange(4)
    together = greedy_localize(model, objective, ids, space=space, max_channels=12, max_rows=9)
    for t, res in zip(ids, together):
        alone = greedy_localize(model, objective, t[None], space=space, max_channels=12)[0]
        assert res.channels == alone.channels
        assert res.trace == pytest.approx(alone.trace, rel=1e-9, abs=1e-9)
        edited = without_neurons(model, res.zeroed, space)
        still = bool(extracted(edited, prompts[t][None], secrets[t][None])[0])
        assert res.flipped == (not still)
        assert res.channels or not res.flipped
    assert any(r.flipped for r in together)


def test_exhaustive_takes_the_neuron_whose_removal_lowers_the_objective_most():
    model = peaked_model(6)
    targets, _, _ = own_secrets(model, 1, seed=7)
    w = windows(8, 8)
    objective = TextObjective(targets, w, torch.tensor([1, 2, 6]))
    space = channel_space(model, ["blocks.1.mlp_hidden"])
    res = exhaustive_localize(model, objective, torch.tensor([0]), space=space, max_channels=1)[0]

    def objective_without(c):
        zeroed = torch.zeros(space.total, dtype=torch.bool)
        zeroed[c] = True
        edited = without_neurons(model, zeroed, space)
        with torch.no_grad():
            return float(objective(edited(objective.inputs(torch.tensor([0]))).unflatten(
                0, (1, 4)), torch.tensor([0]))[0][0])

    values = [objective_without(c) for c in range(space.total)]
    assert res.channels[0] == ("blocks.1.mlp_hidden", min(range(space.total),
                                                          key=values.__getitem__))
    assert res.trace[1] == pytest.approx(min(values), rel=1e-9)


def test_edit_measures_equal_those_of_a_weight_edited_model(tmp_path):
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    data = load_text_data(f"text:{corpus}", seq_len=96, seed=0, canaries=3,
                          canary_reps=(1, 2), dup_paragraphs=1, dup_reps=2)
    model = peaked_model(9, context=96)
    space = channel_space(model, ["blocks.0.mlp_hidden", "blocks.1.mlp_hidden"])
    gen = torch.Generator().manual_seed(9)
    zeroed = torch.rand(len(data.inserts), space.total, generator=gen) < 0.2
    got = edit_measures(model, data, space, data.inserts, zeroed)
    for insert, z, line in zip(data.inserts, zeroed, got):
        plain = edit_measures(without_neurons(model, z, space), data, space, [insert],
                              torch.zeros(1, space.total, dtype=torch.bool))[0]
        for key, value in plain.items():
            if key.endswith("_before"):
                after = key.replace("_before", "_after")
                assert line[after] == pytest.approx(value, rel=1e-9, abs=1e-12), after
        assert set(line) >= {"heldout_bpb_before", "heldout_bpb_after"}
        assert ("exposure_after" in line) == (insert.kind == "canary")


def test_clean_reference_holds_no_planted_copy(tmp_path):
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    data = load_text_data(f"text:{corpus}", seq_len=32, seed=0, canaries=4, canary_reps=(3,))
    ref = clean_reference(data, 10_000, seed=1)
    assert len(ref) == int((~data.noisy_mask).sum()) and not data.noisy_mask[ref].any()
    assert torch.equal(clean_reference(data, 5, seed=1), clean_reference(data, 5, seed=1))
    assert sequence_targets(data.inserts, data).keys.tolist() == \
        [int(data.mask_keys[data.copies(i.id)[0]]) for i in data.inserts]


TINY = "gpt?layers=1&width=32&heads=2&mlp=64"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("textloc")
    corpus = write_works(root / "c", count=5, lines=40)
    result = run_cli("train", "--dataset", f"text:{corpus}", "--model", TINY, "--seq-len", "32",
                     "--canaries", "4", "--canary-reps", "1,8", "--epochs", "1",
                     "--batch-size", "32", "--out", root / "run", "--no-progress",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root / "run"


def test_localize_cli_on_a_text_run_writes_lines_and_resumes(text_run, tmp_path):
    out = tmp_path / "loc.jsonl"
    args = ("localize", "--run", text_run, "--out", out, "--ref-batch", "8", "--no-progress",
            "--device", "cpu")
    first = run_cli(*args, "--limit", "2")
    assert first.exit_code == 0, first.output
    assert "canaries x8" in first.output and "exposure" in first.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reps"] for r in rows] == [8, 8]  # most-repeated first
    for r in rows:
        assert r["kind"] == "canary" and r["fitted"] == (not (r["flipped"] and
                                                              not r["n_channels"]))
        assert r["settings"]["sites"] == ["blocks.0.mlp_hidden"]
        assert 0 <= r["heldout_bpb_before"] < 8.5 and math.isfinite(r["exposure_after"])
    again = run_cli(*args)
    assert again.exit_code == 0, again.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    summary = json.loads(out.with_name("loc.summary.json").read_text())
    assert summary["text"] and summary["examples"] == 4
    assert out.with_name("loc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra,words", [
    (("--examples", "noisy"), "takes an image run"),
    (("--examples", "paragraphs"), "no paragraphs"),
    (("--eot", "2"), "--eot"),
    (("--sites", "blocks.9.mlp_hidden"), "unknown site"),
])
def test_localize_refuses_bad_text_input_in_one_line(text_run, tmp_path, extra, words):
    out = tmp_path / "loc.jsonl"
    result = run_cli("localize", "--run", text_run, "--out", out, "--no-progress", *extra)
    assert_one_line_error(result, words)
    assert not out.exists()


def test_canaries_on_an_image_run_are_refused(run):
    assert_one_line_error(run_cli("localize", "--run", run, "--examples", "canaries",
                                  "--no-progress"), "takes a text run")


def test_text_demo_trains_localizes_scores_and_reports_both_runs(tmp_path, monkeypatch):
    import dataclasses

    import memkern.demo as demo
    from memkern.training.config import PRESETS, TrainConfig

    corpus = write_works(tmp_path / "c", count=5, lines=40)
    tiny = TrainConfig(dataset=f"text:{corpus}", model=TINY, noise=0.0, seq_len=32,
                       canaries=4, canary_reps=(1, 8), epochs=1, batch_size=32, lr=0.3)
    monkeypatch.setitem(PRESETS, "tiny-text", tiny)
    monkeypatch.setitem(PRESETS, "tiny-text-tied", dataclasses.replace(tiny, tied_dropout=True))
    monkeypatch.setattr(demo, "TEXT_RUNS", {"plain": "tiny-text", "tied": "tiny-text-tied"})
    result = run_cli("demo", "--text", "--out", tmp_path / "d", "--no-progress",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    for name in ("plain", "tied"):
        assert (tmp_path / "d" / name / "localize.summary.json").is_file()
        assert (tmp_path / "d" / name / "scores" / "text_benchmark.csv").is_file()
    page = (tmp_path / "d" / "report" / "index.html").read_text()
    assert "neurons that hold a secret" in page and "memorization neurons kept" in page
    assert "plain run" in result.output and "tied run" in result.output


def test_the_target_part_bounds_the_objective_from_below():
    """The exhaustive argmin prunes by it: the secret's part is at most the whole objective
    (the clean windows' mean loss is never negative), here on a model's real logits."""
    model = peaked_model(4)
    targets, _, _ = own_secrets(model, 2, seed=5)
    objective = TextObjective(targets, windows(6, 8), torch.tensor([0, 3, 5]))
    t = torch.tensor([0, 1])
    with torch.no_grad():
        logits = model(objective.inputs(t)).unflatten(0, (2, objective.rows_per_target))
    value, _ = objective(logits, t)
    part, _ = objective.target_terms(logits[:, :objective.target_rows], t)
    assert (part < value).all()
