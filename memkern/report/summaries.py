"""What each command found, in numbers: the text it prints when it ends.

Pure functions of the rows the commands return or write (metrics.jsonl lines, grads/summary.csv
rows, rewind.csv / retrain.csv rows) as text tables; the sentences are the report's
(:mod:`memkern.report.findings`), so a command, ``memkern demo`` (:func:`run_findings`) and the report
say the same thing. An accuracy that is undefined (no noisy examples) shows "-".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from memkern.report import findings
ACCURACIES = ("clean_acc", "noisy_acc", "test_acc")
ACCURACY_HEADER = ("clean-train", "noisy-train", "test")


def number(value, spec: str = ".3f") -> str:
    """``value`` formatted, or "-" when it is missing or not a number (nan, empty cells)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else format(value, spec)


def text_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                     for row in cells)


def _accuracies(row: dict, suffix: str = "") -> list[str]:
    return [number(row.get(k + suffix)) for k in ACCURACIES]


def accuracy_text(row: dict) -> str:
    """``clean 0.950  noisy 0.215  test 0.931`` (noisy: against the flipped labels)."""
    return "  ".join(f"{k.removesuffix('_acc')} {number(row.get(k))}" for k in ACCURACIES)


def epoch_line(metrics: dict, *, epochs: int) -> str:
    """One epoch of training: ``epoch 3/30  loss 0.5120  clean 0.950  noisy 0.215  test 0.931``
    (a text run's: :func:`memkern.report.text_summaries.text_epoch_line`)."""
    from memkern.report.text_summaries import is_text_metrics, text_epoch_line

    if is_text_metrics(metrics):
        return text_epoch_line(metrics, epochs=epochs)
    return (f"epoch {metrics['epoch']}/{epochs}  loss {number(metrics.get('train_loss'), '.4f')}"
            f"  {accuracy_text(metrics)}")


def training_summary(metrics: list[dict]) -> str:
    """Accuracies after the last epoch of ``metrics`` (metrics.jsonl lines); for a tied-dropout
    run also with memorization channels kept (x p_mem) and dropped. Noisy-train accuracy is
    measured against the flipped labels: 1.0 means every flipped label was memorized."""
    from memkern.report.text_summaries import is_text_metrics, text_training_summary

    if not metrics:
        return "no epoch trained yet"
    if is_text_metrics(metrics[-1]):
        return text_training_summary(metrics)
    last = metrics[-1]
    rows = [["each example's own masks" if "noisy_acc_keep" in last else "model",
             *_accuracies(last)]]
    if "noisy_acc_keep" in last:
        rows += [["memorization channels kept x p_mem", *_accuracies(last, "_keep")],
                 ["memorization channels dropped", *_accuracies(last, "_drop")]]
    return (f"after epoch {last['epoch']} (noisy-train: accuracy on the flipped labels)\n"
            + text_table(("accuracy", *ACCURACY_HEADER), rows))


def accounting_summary(rows: list[dict], *, text: bool = False) -> str:
    """Clean vs noisy summed gradients at the last epoch of grads/summary.csv's ``rows``: per
    group the two norms, their ratio (noisy / clean) and their cosine; ``text``: a text run's
    (its noisy split: the windows holding a planted copy)."""
    if not rows:
        return "no epoch accounted"
    last = max(int(r["epoch"]) for r in rows)
    table = []
    for r in rows:
        if int(r["epoch"]) != last:
            continue
        clean, noisy = float(r["clean_norm"]), float(r["noisy_norm"])
        table.append([r["group"], number(clean, ".4g"), number(noisy, ".4g"),
                      number(noisy / clean if clean > 0 else float("nan"), ".2f"),
                      number(r["cosine"], ".3f")])
    split = "clean and the planted (noisy) windows" if text else "clean and the noisy examples"
    return (f"summed gradients of the {split} at epoch {last}\n"
            + text_table(("group", "clean norm", "noisy norm", "noisy/clean", "cosine"), table))


def _by_group(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["group"], []).append(r)
    return out


def rewind_summary(rows: list[dict]) -> str:
    """The key rows of rewind.csv: the final model, then each group rewound to the earliest and
    to the latest rewind epoch, and the report's finding on them."""
    baseline = findings.BASELINE
    base = next(r for r in rows if r["group"] == baseline)
    groups = _by_group([r for r in rows if r["group"] != baseline])
    if not groups:
        return "no configuration rewound"
    table = [[f"{baseline} (epoch {base['epoch']})", "-", *_accuracies(base)]]
    for name, rs in groups.items():
        ordered = sorted(rs, key=lambda r: r["epoch"])
        for r in {ordered[0]["epoch"]: ordered[0], ordered[-1]["epoch"]: ordered[-1]}.values():
            table.append([name, r["epoch"], *_accuracies(r)])
    return (text_table(("group", "rewound to", *ACCURACY_HEADER), table) + "\n"
            + findings.caveated(findings.rewind_finding(rows), base))


def retrain_summary(rows: list[dict]) -> str:
    """Per group of retrain.csv: accuracies right after the reset and after the last epoch of
    retraining on clean examples; noisy-train accuracy that comes back was memorized elsewhere."""
    groups = _by_group(rows)
    if not groups:
        return "no group retrained"
    table = []
    for name, rs in groups.items():
        first = min(rs, key=lambda r: r["epoch"])
        last = max(rs, key=lambda r: r["epoch"])
        table.append([name, number(first["noisy_acc"]), last["epoch"], *_accuracies(last)])
    return ("each group reset, the rest frozen, retrained on clean examples only\n"
            + text_table(("group", "noisy after reset", "epochs", *ACCURACY_HEADER), table))


def _filled(value) -> bool:
    return value is not None and value != ""


def benchmark_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """``scores --benchmark`` rows (as written to benchmark.csv, or in memory) as a header and
    cells: best first (the signals that score every example, by AUROC, then the partial ones),
    AUROC, AP and precision@k with the digits that tell them apart, k stated, and no column
    that is empty in every row."""
    everyone = max(int(r["covered"]) for r in rows)

    def rank(r):
        auroc = float(r["auroc"]) if _filled(r.get("auroc")) else math.nan
        return (int(r["covered"]) != everyone, -auroc if not math.isnan(auroc) else 1.0)

    rows = sorted(rows, key=rank)
    k = next(r["flipped"] for r in rows if int(r["covered"]) == everyone)
    columns = [("method", "method"), ("covered", "examples scored"),
               ("flipped", "flipped among them"), ("auroc", "AUROC"),
               ("ap", "average precision"),
               ("precision_at_k", f"precision@k (k = flipped among them: {k} for all)"),
               ("trainings", "trainings"), ("seconds", "seconds"), ("flagged", "flagged"),
               ("flagged_precision", "flagged precision"), ("flagged_recall", "flagged recall")]
    columns = [(c, name) for c, name in columns if any(_filled(r.get(c)) for r in rows)]
    digits = {c: findings.separated([float(r[c]) if _filled(r.get(c)) else None for r in rows])
              for c in ("auroc", "ap", "precision_at_k", "flagged_precision", "flagged_recall")}

    def cell(c: str, i: int, r: dict) -> str:
        if not _filled(r.get(c)):
            return ""
        if c in digits:
            return digits[c][i]
        return f"{float(r[c]):.0f}" if c == "seconds" else str(r[c])

    return ([name for _, name in columns],
            [[cell(c, i, r) for c, _ in columns] for i, r in enumerate(rows)])


def run_findings(run: str | Path) -> list[str]:
    """The report's finding for each analysis present in run directory ``run`` (training, with
    the tied-dropout modes on a tied run, gradient accounting, rewinding, retraining,
    localization, the tied-dropout channel enrichment, memorization scores), in that order,
    after the report's caveat when the run did not memorize."""
    from memkern.report.run_tables import load_run_tables

    t = load_run_tables(run)
    if t.config.text:
        from memkern.report.text_page import text_findings
        return text_findings(t)
    lines = [findings.memorization_caveat(t.last),
             findings.training_finding(t.last, epochs=t.last["epoch"],
                                       noisy=len(t.noise["noisy_indices"]),
                                       train=t.noise["num_train"]),
             t.grads and findings.accounting_finding(t.grads),
             t.rewind and findings.rewind_finding(t.rewind),
             t.retrain and findings.retrain_finding(t.retrain),
             t.localize and findings.localization_finding(t.localize),
             t.localize and findings.tied_share_finding(t.localize),
             t.benchmark and findings.scores_finding(t.benchmark)]
    return [line for line in lines if line]
