"""What a text run's training found, in numbers: extraction and exposure by reps group."""
from __future__ import annotations

import re

from memkern.report.summaries import number, text_table

_GROUP = re.compile(r"extracted_r(\d+)$")


def is_text_metrics(row: dict) -> bool:
    return "heldout_bpb" in row


def reps_groups(row: dict) -> list[int]:
    """The canary reps groups a metrics line reports, ascending."""
    return sorted(int(m.group(1)) for k in row if (m := _GROUP.match(k)))


def text_epoch_line(metrics: dict, *, epochs: int) -> str:
    """``epoch 3/8  loss 1.9  held-out 2.41 bits/byte  extracted r1 0.00 r64 0.95``."""
    return (f"epoch {metrics['epoch']}/{epochs}  loss {number(metrics.get('train_loss'), '.4f')}"
            f"  {measure_text(metrics)}")


def measure_text(row: dict) -> str:
    """``held-out 2.41 bits/byte  extracted r1 0.00 r64 0.95``."""
    groups = " ".join(f"r{r} {number(row.get(f'extracted_r{r}'), '.2f')}"
                      for r in reps_groups(row))
    return (f"held-out {number(row.get('heldout_bpb'), '.3f')} bits/byte"
            + (f"  extracted {groups}" if groups else ""))


def text_training_summary(metrics: list[dict]) -> str:
    """Canary extraction and mean exposure by reps group after the last epoch; for a tied-
    dropout run also with memorization neurons kept (x p_mem) and dropped."""
    last = metrics[-1]
    modes = [("", "own masks" if "heldout_bpb_keep" in last else "model")]
    if "heldout_bpb_keep" in last:
        modes += [("_keep", "neurons kept x p_mem"), ("_drop", "neurons dropped")]
    lines = [f"after epoch {last['epoch']}: held-out "
             + ", ".join(f"{number(last.get('heldout_bpb' + s), '.3f')} bits/byte ({name})"
                         for s, name in modes)]
    groups = reps_groups(last)
    if groups:
        rows = [[f"{r} copies", *[number(last.get(f"extracted_r{r}{s}"), ".2f") for s, _ in modes],
                 *[number(last.get(f"exposure_r{r}{s}"), ".1f") for s, _ in modes]]
                for r in groups]
        header = ("canaries", *[f"extracted ({n})" for _, n in modes],
                  *[f"exposure ({n})" for _, n in modes])
        lines.append(text_table(header, rows))
    if "suffix_acc" in last:
        lines.append(f"duplicated paragraphs: suffix accuracy {number(last['suffix_acc'])}")
    return "\n".join(lines)


def _measure_cells(row: dict, groups: list[int]) -> list[str]:
    return [number(row["heldout_bpb"]), *[number(row[f"extracted_r{r}"], ".2f") for r in groups]]


def text_rewind_summary(rows: list[dict]) -> str:
    """The key rows of a text run's rewind.csv: the final model, then each group rewound to the
    earliest and to the latest rewind epoch; held-out bits per byte and extraction by reps
    group."""
    base, configs = rows[0], rows[1:]
    if not configs:
        return "no configuration rewound"
    groups = reps_groups(base)
    table = [[f"{base['group']} (epoch {base['epoch']})", "-", *_measure_cells(base, groups)]]
    for name in dict.fromkeys(r["group"] for r in configs):
        ordered = sorted((r for r in configs if r["group"] == name), key=lambda r: r["epoch"])
        for r in {ordered[0]["epoch"]: ordered[0], ordered[-1]["epoch"]: ordered[-1]}.values():
            table.append([name, r["epoch"], *_measure_cells(r, groups)])
    return text_table(("group", "rewound to", "held-out bits/byte",
                       *[f"extracted r{r}" for r in groups]), table)


def text_retrain_summary(rows: list[dict]) -> str:
    """Per group of a text run's retrain.csv: extraction by reps group right after the reset and
    after the last epoch of retraining on clean windows; a canary extracted again was kept by
    the frozen groups."""
    if not rows:
        return "no group retrained"
    groups = reps_groups(rows[0])
    table = []
    for name in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == name]
        first = min(mine, key=lambda r: r["epoch"])
        last = max(mine, key=lambda r: r["epoch"])
        table.append([name, *[number(first[f"extracted_r{r}"], ".2f") for r in groups],
                      last["epoch"], *_measure_cells(last, groups)])
    return ("each group reset, the rest frozen, retrained on clean windows only\n"
            + text_table(("group", *[f"r{r} after reset" for r in groups], "epochs",
                          "held-out bits/byte", *[f"extracted r{r}" for r in groups]), table))
