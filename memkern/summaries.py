"""What each command found, in numbers: the text it prints when it ends.

Pure functions of the rows the commands return or write (metrics.jsonl lines, grads/summary.csv
rows, rewind.csv / retrain.csv rows, localize_summary.json), so the command line, ``memkern
demo`` and tests share one wording; :func:`run_findings` reads those files from a run
directory. An accuracy that is undefined (no noisy examples) shows "-".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

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
    """One epoch of training: ``epoch 3/30  loss 0.5120  clean 0.950  noisy 0.215  test 0.931``."""
    return (f"epoch {metrics['epoch']}/{epochs}  loss {number(metrics.get('train_loss'), '.4f')}"
            f"  {accuracy_text(metrics)}")


def training_summary(metrics: list[dict]) -> str:
    """Accuracies after the last epoch of ``metrics`` (metrics.jsonl lines); for a tied-dropout
    run also with memorization channels kept (x p_mem) and dropped. Noisy-train accuracy is
    measured against the flipped labels: 1.0 means every flipped label was memorized."""
    if not metrics:
        return "no epoch trained yet"
    last = metrics[-1]
    rows = [["each example's own masks" if "noisy_acc_keep" in last else "model",
             *_accuracies(last)]]
    if "noisy_acc_keep" in last:
        rows += [["memorization channels kept x p_mem", *_accuracies(last, "_keep")],
                 ["memorization channels dropped", *_accuracies(last, "_drop")]]
    return (f"after epoch {last['epoch']} (noisy-train: accuracy on the flipped labels)\n"
            + text_table(("accuracy", *ACCURACY_HEADER), rows))


def accounting_summary(rows: list[dict]) -> str:
    """Clean vs noisy summed gradients at the last epoch of grads/summary.csv's ``rows``: per
    group the two norms, their ratio (noisy / clean) and their cosine."""
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
    return (f"summed gradients of the clean and the noisy examples at epoch {last}\n"
            + text_table(("group", "clean norm", "noisy norm", "noisy/clean", "cosine"), table))


def _by_group(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["group"], []).append(r)
    return out


def rewind_summary(rows: list[dict], *, baseline: str = "final") -> str:
    """The key rows of rewind.csv: the final model, then each group rewound to the earliest and
    to the latest rewind epoch, and the group whose rewinding costs the noisy examples most."""
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
            + rewind_headline(rows, baseline=baseline))


def rewind_headline(rows: list[dict], *, baseline: str = "final") -> str:
    """The group whose rewinding to the earliest epoch costs the noisy examples most."""
    base = next(r for r in rows if r["group"] == baseline)
    earliest = {name: min(rs, key=lambda r: r["epoch"])
                for name, rs in _by_group([r for r in rows if r["group"] != baseline]).items()}
    if not earliest:
        return "no configuration rewound"
    worst = min(earliest.values(), key=lambda r: _sort_key(r["noisy_acc"]))
    return (f"rewinding {worst['group']} to epoch {worst['epoch']} drops noisy-train accuracy "
            f"to {number(worst['noisy_acc'])} while test accuracy is {number(worst['test_acc'])}"
            f" (final model: {number(base['noisy_acc'])} and {number(base['test_acc'])})")


def _sort_key(value) -> float:
    """An accuracy as a float; missing ones sort last in a minimum."""
    text = number(value, ".9f")
    return math.inf if text == "-" else float(text)


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


def localize_headline(summary: dict) -> str:
    """Channels needed to flip noisy vs clean examples (localize_summary.json's ``summary``)."""
    parts = []
    for name in ("noisy", "clean"):
        g = summary["groups"].get(name)
        if g and g["count"]:
            parts.append(f"{name} examples flip after a median of "
                         f"{number(g['median_channels_flipped'], 'g')} zeroed channels "
                         f"(flip rate {number(g['flip_rate'], '.2f')} of {g['count']})")
    return "; ".join(parts) if parts else "no example localized"


def retrain_headline(rows: list[dict]) -> str:
    """How far noisy-train accuracy comes back when each group is retrained on clean data."""
    finals = [max(rs, key=lambda r: r["epoch"]) for rs in _by_group(rows).values()]
    finals = [r for r in finals if number(r["noisy_acc"]) != "-"]
    if not finals:
        return "no group retrained with noisy examples to measure"
    low = min(finals, key=lambda r: _sort_key(r["noisy_acc"]))
    high = max(finals, key=lambda r: _sort_key(r["noisy_acc"]))
    return (f"retrained on clean examples only, noisy-train accuracy comes back to "
            f"{number(high['noisy_acc'])} ({high['group']}) at most and "
            f"{number(low['noisy_acc'])} ({low['group']}) at least")


def accounting_headline(rows: list[dict], *, group: str = "total") -> str:
    """Noisy vs clean summed gradient of ``group`` at the first trained and the last epoch
    accounted (grads/summary.csv rows)."""
    picked = {int(r["epoch"]): r for r in rows if r["group"] == group and int(r["epoch"]) > 0}
    if not picked:
        return "no trained epoch accounted"
    parts = []
    for epoch in sorted({min(picked), max(picked)}):
        r = picked[epoch]
        clean, noisy = float(r["clean_norm"]), float(r["noisy_norm"])
        ratio = noisy / clean if clean > 0 else float("nan")
        parts.append(f"epoch {epoch}: {number(ratio, '.2f')}x the clean norm, cosine "
                     f"{number(r['cosine'], '.2f')}")
    return "summed gradient of the noisy examples vs the clean ones, " + "; ".join(parts)


def run_findings(run: str | Path) -> list[str]:
    """One headline per analysis present in run directory ``run`` (training, tied dropout,
    gradient accounting, rewinding, retraining, localization), from the files they wrote."""
    from memkern.atomic import read_json_object
    from memkern.runs import RunDir
    from memkern.tables import read_csv, read_table

    run = RunDir(run)
    lines = []
    metrics = run.load_metrics()
    if metrics:
        last = metrics[-1]
        lines.append(f"after {last['epoch']} epochs: noisy-train (flipped labels) "
                     f"{number(last['noisy_acc'])}, clean-train {number(last['clean_acc'])}, "
                     f"test {number(last['test_acc'])}")
        if "noisy_acc_drop" in last:
            lines.append(f"memorization channels dropped: noisy-train "
                         f"{number(last['noisy_acc_drop'])}, clean-train "
                         f"{number(last['clean_acc_drop'])}, test {number(last['test_acc_drop'])}")
    grads = read_csv(run.grads / "summary.csv")
    if grads:
        lines.append(accounting_headline(grads))
    for name, headline in (("rewind", rewind_headline), ("retrain", retrain_headline)):
        rows = read_table(run.root / f"{name}.csv")
        if rows:
            lines.append(headline(rows))
    if (run.root / "localize_summary.json").is_file():
        lines.append(localize_headline(read_json_object(run.root / "localize_summary.json")))
    return lines
