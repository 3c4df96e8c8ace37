"""Scores of a text run: per-window statistics equal a one-window loop, the signals point at
planted windows, the run resumes from its saved statistics, and the report shows the benchmark."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_checks import assert_one_line_error, run_cli
from test_text_data import write_works

import memkern.experiments.scores.text_run as text_run_mod
from memkern.experiments.scores.text_signals import window_stats
from memkern.network.models import build_text_model

SPEC = "gpt?layers=2&width=32&heads=2&mlp=48"


def test_window_stats_equal_a_loop_over_windows():
    torch.manual_seed(0)
    model = build_text_model(SPEC, vocab=256, context=16).double().eval()
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (7, 17), generator=gen, dtype=torch.uint8)
    got = window_stats(model, windows, None, rows=3)
    for w, window in enumerate(windows.long()):
        with torch.no_grad():
            logits = model(window[None, :-1])[0]
        y = window[1:]
        assert float(got.nll[w]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-9)
        margins = [float(logits[t, y[t]]) - max(float(v) for c, v in enumerate(logits[t])
                                                if c != y[t]) for t in range(len(y))]
        assert float(got.margin[w]) == pytest.approx(np.mean(margins), rel=1e-9)
        assert float(got.accuracy[w]) == pytest.approx(
            float((logits.argmax(-1) == y).double().mean()))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("textscores")
    corpus = write_works(root / "c", count=5, lines=40)
    result = run_cli("train", "--dataset", f"text:{corpus}", "--model",
                     "gpt?layers=1&width=32&heads=2&mlp=64", "--seq-len", "32", "--canaries",
                     "3", "--canary-reps", "1,24", "--epochs", "3", "--batch-size", "16",
                     "--out", root / "run", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root / "run"


def test_scores_cli_on_a_text_run_writes_every_window_and_resumes(text_run, monkeypatch):
    result = run_cli("scores", "--run", text_run, "--benchmark", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output and "planted windows" in result.output
    lines = (text_run / "scores.csv").read_text().splitlines()
    record = json.loads((text_run / "canaries.json").read_text())
    assert len(lines) == 1 + record["num_train"]
    header = lines[0].split(",")
    assert header[:4] == ["index", "insert", "reps", "memorized"]
    assert {"aum", "final_loss", "confidence", "memorization_score"} <= set(header)
    planted = sum(len(i["indices"]) for i in record["inserts"])
    assert sum(int(line.split(",")[3]) for line in lines[1:]) == planted
    bench = (text_run / "scores" / "text_benchmark.csv").read_text().splitlines()
    assert bench[0].startswith("signal,covered,auroc,ap,auroc_r1,auroc_r24")
    for row in bench[1:]:
        auroc = float(row.split(",")[2])
        assert 0.0 <= auroc <= 1.0
    with np.load(text_run / "scores" / "window_stats.npz") as f:
        assert f["epochs"].tolist() == [1, 2, 3]
    # A rerun computes no epoch again: every checkpoint's statistics are saved.
    monkeypatch.setattr(text_run_mod, "window_stats",
                        lambda *a, **k: pytest.fail("recomputed a saved epoch"))
    again = run_cli("scores", "--run", text_run, "--no-progress")
    assert again.exit_code == 0, again.output
    # with gradient accounting done, its per-window norms join the signals
    monkeypatch.undo()
    assert run_cli("grads", "--run", text_run, "--epochs", "1,3", "--no-progress").exit_code == 0
    assert run_cli("scores", "--run", text_run, "--no-progress").exit_code == 0
    header = (text_run / "scores.csv").read_text().splitlines()[0].split(",")
    assert {"grad_total_e001", "grad_total_e003"} <= set(header)
    assert not any(h.startswith("grad_insert") for h in header)
    reported = run_cli("report", "--run", text_run)
    assert reported.exit_code == 0, reported.output
    assert "finds the planted windows best" in \
        (text_run / "report" / "index.html").read_text()


def test_foreign_statistics_are_refused_in_one_line(text_run, tmp_path):
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(text_run, copy)
    (copy / "scores").mkdir(exist_ok=True)
    (copy / "scores" / "window_stats.npz").write_bytes(b"not an npz archive")
    before = (copy / "scores.csv").read_bytes() if (copy / "scores.csv").exists() else None
    assert_one_line_error(run_cli("scores", "--run", copy, "--no-progress"),
                          "window statistics")
    after = (copy / "scores.csv").read_bytes() if (copy / "scores.csv").exists() else None
    assert before == after
