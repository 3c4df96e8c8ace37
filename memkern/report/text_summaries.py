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
    groups = " ".join(f"r{r} {number(metrics.get(f'extracted_r{r}'), '.2f')}"
                      for r in reps_groups(metrics))
    return (f"epoch {metrics['epoch']}/{epochs}  loss {number(metrics.get('train_loss'), '.4f')}"
            f"  held-out {number(metrics.get('heldout_bpb'), '.3f')} bits/byte"
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
