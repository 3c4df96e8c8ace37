"""What commands print when they end (memkern.report.summaries) and how they show progress
(memkern.rundir.progress)."""
from __future__ import annotations

import io
import math
import sys

from memkern.rundir.progress import Progress
from memkern.report.summaries import (accounting_summary, epoch_line, number, retrain_summary,
                               rewind_summary, text_table, training_summary)

PLAIN = {"epoch": 30, "train_loss": 0.003, "clean_acc": 1.0, "noisy_acc": 0.9861,
         "test_acc": 0.9528}
TIED = {**PLAIN, "epoch": 10, "clean_acc_keep": 0.99, "noisy_acc_keep": 0.007,
        "test_acc_keep": 0.981, "clean_acc_drop": 0.97, "noisy_acc_drop": 0.014,
        "test_acc_drop": 0.975}


def test_numbers_and_missing_values():
    assert number(0.98612) == "0.986"
    assert [number(v) for v in (None, math.nan, "", "nan")] == ["-"] * 4
    assert number("0.25", ".2f") == "0.25"  # CSV cells are strings


def test_text_table_aligns_columns():
    lines = text_table(("group", "acc"), [["a", "0.5"], ["longer", "1"]]).splitlines()
    assert lines == ["group   acc", "a       0.5", "longer    1"]


def test_training_summary_gives_the_final_accuracies():
    text = training_summary([{**PLAIN, "epoch": 29}, PLAIN])
    assert "after epoch 30" in text
    assert text.splitlines()[-1].split() == ["model", "1.000", "0.986", "0.953"]
    assert training_summary([]) == "no epoch trained yet"


def test_training_summary_of_a_tied_run_adds_keep_and_drop():
    lines = training_summary([TIED]).splitlines()
    assert lines[-2].split()[-3:] == ["0.990", "0.007", "0.981"]
    assert lines[-1].startswith("memorization channels dropped")
    assert lines[-1].split()[-3:] == ["0.970", "0.014", "0.975"]


def test_undefined_noisy_accuracy_shows_as_a_dash():
    assert training_summary([{**PLAIN, "noisy_acc": None}]).splitlines()[-1].split()[2] == "-"
    assert "noisy -" in epoch_line({**PLAIN, "noisy_acc": None}, epochs=30)


def test_epoch_line():
    assert epoch_line(PLAIN, epochs=30) == ("epoch 30/30  loss 0.0030  clean 1.000  noisy 0.986"
                                            "  test 0.953")


def _grads_row(epoch, group, clean, noisy, cosine):
    # as read back from grads/summary.csv: strings
    return {"epoch": str(epoch), "group": group, "clean_norm": str(clean),
            "noisy_norm": str(noisy), "cosine": str(cosine)}


def test_accounting_summary_uses_the_last_epoch():
    rows = [_grads_row(0, "conv1", 1.0, 9.0, 0.5), _grads_row(0, "total", 1.0, 9.0, 0.5),
            _grads_row(30, "conv1", 0.2, 0.1, -0.25), _grads_row(30, "total", 0.4, 0.3, -0.3)]
    lines = accounting_summary(rows).splitlines()
    assert "epoch 30" in lines[0]
    assert lines[2].split() == ["conv1", "0.2", "0.1", "0.50", "-0.250"]
    assert lines[3].split() == ["total", "0.4", "0.3", "0.75", "-0.300"]
    assert len(lines) == 4
    assert accounting_summary([]) == "no epoch accounted"


def _acc(group, epoch, clean, noisy, test):
    return {"group": group, "epoch": epoch, "clean_acc": clean, "noisy_acc": noisy,
            "test_acc": test}


REWIND = [_acc("final", 30, 1.0, 1.0, 0.95),
          _acc("conv1", 0, 0.5, 0.4, 0.5), _acc("head", 0, 0.9, 0.1, 0.9),
          _acc("conv1", 15, 0.9, 0.9, 0.9), _acc("head", 15, 1.0, 0.8, 0.94),
          _acc("conv1", 27, 1.0, 0.95, 0.95), _acc("head", 27, 1.0, 0.99, 0.95)]


def test_rewind_summary_keeps_the_key_rows():
    lines = rewind_summary(REWIND).splitlines()
    table = [line.split() for line in lines[1:-1]]
    assert table[0][:3] == ["final", "(epoch", "30)"]
    # each group at its earliest and latest rewind epoch, not the ones between
    assert [r[:2] for r in table[1:]] == [["conv1", "0"], ["conv1", "27"], ["head", "0"],
                                           ["head", "27"]]
    # the closing finding: head at epoch 15 lowers noisy accuracy most (0.80) while test
    # accuracy (0.94) stays within 0.02 of the final model's (noisy 1.00, test 0.95)
    assert lines[-1].startswith("Rewinding head to epoch 15")
    assert ["0.80", "0.94", "1.00", "0.95"] == [w.strip("().,;") for w in lines[-1].split()
                                               if w.strip("().,;")[:2] in ("0.", "1.")][:4]


RETRAIN = [_acc("conv1", 0, 0.5, 0.3, 0.5), _acc("conv1", 1, 0.9, 0.6, 0.9),
           _acc("conv1", 2, 1.0, 0.8, 0.95), _acc("head", 0, 0.9, 0.1, 0.9),
           _acc("head", 1, 1.0, 0.05, 0.95), _acc("head", 2, 1.0, 0.02, 0.96)]


def test_retrain_summary_gives_reset_and_final_rows():
    lines = retrain_summary(RETRAIN).splitlines()
    assert [line.split() for line in lines[2:]] == [
        ["conv1", "0.300", "2", "1.000", "0.800", "0.950"],
        ["head", "0.100", "2", "1.000", "0.020", "0.960"]]


def test_progress_prints_one_line_per_step_when_stdout_is_not_a_terminal(capsys):
    with Progress(total=4, desc="train x", unit="step") as bar:
        for epoch in (1, 2):
            bar.advance(2)
            bar.step(f"epoch {epoch}/2")
    captured = capsys.readouterr()
    assert captured.out == "train x: epoch 1/2\ntrain x: epoch 2/2\n"
    assert "\r" not in captured.err


def test_plain_progress_says_it_is_alive_between_far_apart_milestones(capsys, monkeypatch):
    """A log gets a line of units done when the last line is a heartbeat old, even when
    nothing finished since (a long localization chunk); a milestone resets the clock."""
    import memkern.rundir.progress as progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with Progress(total=4, desc="localize", unit="example", initial=1) as bar:
        bar.advance(1)
        now[0] += progress.HEARTBEAT_S - 1
        bar.advance(0)
        assert capsys.readouterr().out == ""
        now[0] += 1
        bar.advance(0)
        assert capsys.readouterr().out == "localize: 2/4 examples done\n"
        now[0] += progress.HEARTBEAT_S / 2
        bar.step("chunk 1")
        now[0] += progress.HEARTBEAT_S / 2
        bar.advance(2)
        assert capsys.readouterr().out == "localize: chunk 1\n"
        now[0] += progress.HEARTBEAT_S / 2
        bar.advance(0)
        assert capsys.readouterr().out == "localize: 4/4 examples done\n"


def test_progress_draws_a_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out, err = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(total=4, desc="train x", unit="step") as bar:
        bar.advance(4)
        bar.step("epoch 1/1")
    assert out.getvalue() == ""
    assert "train x" in err.getvalue() and "4/4" in err.getvalue()
    # --no-progress on a terminal: plain lines again
    with Progress(total=1, desc="train x", unit="step", bar=False) as bar:
        bar.step("epoch 1/1")
    assert out.getvalue() == "train x: epoch 1/1\n"
    # stderr (where the bar goes) sent to a file: plain lines, no redraws in the file
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with Progress(total=1, desc="train x", unit="step") as bar:
        bar.advance()
        bar.step("epoch 1/1")
    assert out.getvalue() == "train x: epoch 1/1\n" * 2 and sys.stderr.getvalue() == ""


def test_silent_progress_shows_nothing(capsys):
    with Progress(total=1, desc="localize", unit="example", silent=True) as bar:
        bar.advance()
        bar.step("1/1 examples localized")
    assert capsys.readouterr() == ("", "")
