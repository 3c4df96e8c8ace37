"""Text runs end to end: `memkern train` on a small corpus writes canaries.json, metrics by reps
group and checkpoints; tied dropout keys every copy of a canary alike; bad input is one line."""
import json
import math

import pytest
import torch
from cli_checks import assert_one_line_error, run_cli
from test_text_data import write_works

import memkern.training.train as train_module
from memkern.data.text import load_text_data
from memkern.network.sites import current_example_indices
from memkern.rundir.context import open_run
from memkern.training.text_evaluate import text_measures

TINY = "gpt?layers=1&width=32&heads=2&mlp=64"


def tiny_args(corpus, out, *extra):
    return ["train", "--dataset", f"text:{corpus}", "--model", TINY, "--seq-len", "32",
            "--canaries", "4", "--canary-reps", "1,8", "--epochs", "1", "--batch-size", "32",
            "--out", out, "--no-progress", "--device", "cpu", *extra]


def test_text_run_writes_its_record_and_metrics(tmp_path):
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    result = run_cli(*tiny_args(corpus, tmp_path / "run", "--dup-paragraphs", "2",
                                "--dup-reps", "3"))
    assert result.exit_code == 0, result.output
    assert "bits/byte" in result.output and "8 copies" in result.output
    record = json.loads((tmp_path / "run" / "canaries.json").read_text())
    assert [i["reps"] for i in record["inserts"]] == [1, 8, 1, 8, 3, 3]
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    for key in ("heldout_bpb", "extracted_r1", "extracted_r8", "exposure_r1", "exposure_r8",
                "suffix_acc", "train_loss"):
        assert isinstance(line[key], float), key
    assert 0 < line["heldout_bpb"] < 8.5 and 0 <= line["exposure_r8"] <= 26.6
    evaluated = run_cli("evaluate", "--run", tmp_path / "run", "--max-candidates", "50",
                        "--json", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads(evaluated.output)
    assert [c["reps"] for c in record["canaries"]] == [1, 8, 1, 8]
    for key in ("extracted_r1", "extracted_r8", "heldout_bpb", "suffix_acc"):
        assert record[key] == pytest.approx(line[key]), key
    for c in record["canaries"]:
        assert c["rank"] >= 1 and 0 <= c["exposure"] <= 8 * math.log2(10)
    ctx = open_run(tmp_path / "run", device="cpu", text_ok=True)
    calls = []  # evaluate's progress moves once per canary's exposure search
    text_measures(ctx.model, ctx.data, max_candidates=50, on_canary=lambda: calls.append(1))
    assert len(calls) == 4
    assert_one_line_error(run_cli("localize", "--examples", "noisy", "--run", tmp_path / "run"),
                          "text run")
    reported = run_cli("report", "--run", tmp_path / "run")
    assert reported.exit_code == 0, reported.output
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "8 copies" in page and "no localization: memkern localize" in page
    assert ctx.config.model == TINY and ctx.model.context == 32
    assert torch.equal(ctx.data.train_windows,
                       load_text_data(f"text:{corpus}", seq_len=32, seed=0, canaries=4,
                                      canary_reps=(1, 8), dup_paragraphs=2,
                                      dup_reps=3).train_windows)


def test_text_run_resumes_bit_identically(tmp_path):
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    flat = ["--lr-schedule", "constant", "--warmup", "0"]
    assert run_cli(*tiny_args(corpus, tmp_path / "a", *flat, "--epochs", "2")).exit_code == 0
    assert run_cli(*tiny_args(corpus, tmp_path / "b", *flat)).exit_code == 0
    assert run_cli("train", "--out", tmp_path / "b", "--resume", "--epochs", "2",
                   "--no-progress").exit_code == 0
    a, b = (open_run(tmp_path / name, device="cpu", text_ok=True) for name in "ab")
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k


def test_tied_dropout_keys_every_copy_of_a_canary_alike(tmp_path, monkeypatch):
    seen = []
    build = train_module.model_for

    def recording(config, data):
        model = build(config, data)
        model.register_forward_pre_hook(lambda m, a: seen.append(current_example_indices()))
        return model

    monkeypatch.setattr(train_module, "model_for", recording)
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    result = run_cli(*tiny_args(corpus, tmp_path / "run", "--tied-dropout"))
    assert result.exit_code == 0, result.output
    assert "neurons dropped" in result.output
    data = open_run(tmp_path / "run", device="cpu", text_ok=True).data
    keys = torch.cat([k for k in seen if k is not None and len(k) > 1][:len(data.owner) // 32])
    width = len(data.owner)
    planted = keys[keys >= width] - width
    assert set(planted.tolist()) <= {i.id for i in data.inserts}
    assert len(planted) > 0 and keys.max() < width + len(data.inserts)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert {"extracted_r8_keep", "extracted_r8_drop", "heldout_bpb_drop"} <= set(line)


@pytest.mark.parametrize("args,fragment", [
    (["--dataset", "digits", "--canaries", "3"], "planted in text"),
    (["--dataset", "digits", "--model", "gpt"], "reads text"),
    (["--dataset", "text:CORPUS", "--model", "cnn"], "reads images"),
    (["--dataset", "text:CORPUS", "--canary-reps", "1,0"], "positive integers"),
    (["--dataset", "text:CORPUS", "--canary-reps", "a"], "positive integers"),
    (["--dataset", "text:CORPUS", "--seq-len", "16", "--canaries", "2"], "must hold it"),
    (["--dataset", "text:MISSING"], "does not exist"),
    (["--dataset", "text:CORPUS", "--noise", "0.1"], "noise 0"),
])
def test_bad_text_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    args = [a.replace("CORPUS", str(corpus)).replace("MISSING", str(tmp_path / "none"))
            for a in args]
    result = run_cli("train", *args, "--out", tmp_path / "run", "--epochs", "1",
                     "--no-progress", "--device", "cpu")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_text_config_fields_round_trip_and_are_checked():
    from memkern.errors import ConfigError
    from memkern.training.config import TrainConfig

    preset = TrainConfig.from_name("gpt-shakespeare")
    assert TrainConfig.from_json(preset.to_json()) == preset
    assert isinstance(preset.canary_reps, tuple) and preset.canaries == 96
    for bad in (["1"], [1, True], 3):
        text = preset.to_json().replace('"canary_reps": [1, 4, 16, 64]',
                                        f'"canary_reps": {json.dumps(bad)}')
        with pytest.raises(ConfigError, match="canary_reps"):
            TrainConfig.from_json(text)
