"""The report's findings in words: one or two sentences per experiment, computed from a run's own
tables (docs/method.md, Experiments 1-5). Every function is pure: it takes the rows as the
commands wrote them (``metrics.jsonl`` lines, ``grads/summary.csv`` rows, rewind / retrain rows,
``localize.summary.json``, ``scores/benchmark.csv`` rows) and returns a sentence, or None when
the table holds too little to say anything.
"""
from __future__ import annotations

import math

TOTAL = "total"  # the all-groups row of grads/summary.csv
BASELINE = "final"  # the unchanged model's row of rewind.csv


def num(value: float | None) -> str:
    """An accuracy, share or ratio as the report prints it: two decimals, "n/a" when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}"


def training_finding(last: dict, *, epochs: int, noisy: int, train: int) -> str:
    """The final epoch's fit of clean and flipped labels and its test accuracy; on a tied-dropout
    run (``*_keep`` / ``*_drop`` keys) also what dropping the memorization channels does."""
    text = (f"After {epochs} epochs the model fits {num(last['clean_acc'])} of the clean and "
            f"{num(last['noisy_acc'])} of the {noisy} flipped training labels (of {train}); "
            f"test accuracy is {num(last['test_acc'])}.")
    if "noisy_acc_drop" in last:
        text += " " + tied_drop_finding(last)
    return text


def tied_drop_finding(last: dict) -> str:
    """A tied-dropout run's final epoch with each example's own memorization channels (as
    trained) against the memorization channels dropped (and kept at p_mem)."""
    return (f"With each example's own memorization channels, as trained, it fits "
            f"{num(last['noisy_acc'])} of the flipped labels; with the memorization channels "
            f"dropped, {num(last['noisy_acc_drop'])} (kept at p_mem: "
            f"{num(last['noisy_acc_keep'])}), while clean-train accuracy goes "
            f"{num(last['clean_acc'])} to {num(last['clean_acc_drop'])} and test accuracy "
            f"{num(last['test_acc'])} to {num(last['test_acc_drop'])}.")


def _by_epoch(summary: list[dict]) -> dict[int, dict[str, dict]]:
    out: dict[int, dict[str, dict]] = {}
    for r in summary:
        out.setdefault(int(r["epoch"]), {})[r["group"]] = r
    return out


def accounting_finding(summary: list[dict]) -> str | None:
    """At the first trained epoch accounted (epoch 0 when it is the only one): the noisy
    examples' summed gradient norm against the clean examples', their mean per-example norms,
    and the sign of the clean-noisy cosine per group."""
    epochs = _by_epoch(summary)
    if not epochs:
        return None
    epoch = min((e for e in epochs if e > 0), default=min(epochs))
    rows = epochs[epoch]
    groups = [g for g in rows if g != TOTAL]
    whole = rows.get(TOTAL) or rows[groups[0]]
    clean, noisy = float(whole["clean_norm"]), float(whole["noisy_norm"])
    if clean <= 0:
        return None
    text = (f"At epoch {epoch} the noisy examples' summed gradient has {num(noisy / clean)} "
            f"times the norm of the clean examples'")
    if whole.get("clean_mean") and float(whole["clean_mean"]) > 0:
        per_example = float(whole["noisy_mean"]) / float(whole["clean_mean"])
        text += f", and a noisy example's own gradient is {num(per_example)} times a clean one's"
    cosines = [float(rows[g]["cosine"]) for g in groups]
    negative = [g for g, c in zip(groups, cosines) if c < 0]
    text += (f". The cosine between the clean and noisy sums is {num(float(whole['cosine']))} "
             f"over all layers, negative in {len(negative)} of {len(groups)} groups"
             + (f" ({', '.join(negative)})." if negative else "."))
    return text


def accounting_ratio_peak(summary: list[dict]) -> tuple[int, float] | None:
    """(epoch, noisy/clean summed-gradient norm over all layers) where the ratio is largest."""
    best = None
    for epoch, rows in _by_epoch(summary).items():
        whole = rows.get(TOTAL)
        if whole and float(whole["clean_norm"]) > 0:
            ratio = float(whole["noisy_norm"]) / float(whole["clean_norm"])
            if best is None or ratio > best[1]:
                best = (epoch, ratio)
    return best


TEST_HOLDS = 0.02  # a test accuracy within this of the final model's "stays"


def rewind_critical(rows: list[dict]) -> dict | None:
    """The rewound configuration that most lowers noisy accuracy while test accuracy stays within
    ``TEST_HOLDS`` of the final model's; without such a configuration (or a baseline row), the
    one that lowers noisy accuracy most at the earliest rewind epoch."""
    configs = [r for r in rows if r["group"] != BASELINE]
    if not configs:
        return None
    base = next((r for r in rows if r["group"] == BASELINE), None)
    if base:
        holding = [r for r in configs if r["test_acc"] >= base["test_acc"] - TEST_HOLDS]
        if holding:
            best = min(holding, key=lambda r: (r["noisy_acc"], r["epoch"]))
            if best["noisy_acc"] < base["noisy_acc"] - 0.05:
                return best
    first = min(r["epoch"] for r in configs)
    return min((r for r in configs if r["epoch"] == first), key=lambda r: r["noisy_acc"])


def rewind_finding(rows: list[dict]) -> str | None:
    """The rewinding that undoes most of the memorization (:func:`rewind_critical`), what
    rewinding the last group to the earliest epoch does, and from which epoch on no single
    group's rewinding matters (docs/method.md, Experiment 2)."""
    critical = rewind_critical(rows)
    if critical is None:
        return None
    base = next((r for r in rows if r["group"] == BASELINE), None)
    configs = [r for r in rows if r["group"] != BASELINE]
    holds = base is not None and critical["test_acc"] >= base["test_acc"] - TEST_HOLDS
    text = (f"Rewinding {critical['group']} to epoch {critical['epoch']} drops noisy accuracy "
            f"to {num(critical['noisy_acc'])} while test accuracy "
            f"{'stays' if holds else 'is'} {num(critical['test_acc'])}"
            + (f" (final model: noisy {num(base['noisy_acc'])}, test {num(base['test_acc'])})."
               if base else "."))
    first = min(r["epoch"] for r in configs)
    last = [r for r in configs if r["epoch"] == first][-1]
    if last["group"] != critical["group"]:
        text += (f" Rewinding the last group, {last['group']}, to epoch {first} leaves noisy "
                 f"accuracy at {num(last['noisy_acc'])}.")
    if base:
        safe = [e for e in sorted({r["epoch"] for r in configs})
                if all(r["noisy_acc"] >= base["noisy_acc"] - 0.05
                       for r in configs if r["epoch"] >= e)]
        if safe and safe[0] > first:
            text += (f" From epoch {safe[0]} on, rewinding any single group keeps noisy "
                     f"accuracy within 0.05 of the final model's.")
    return text


def retrain_finding(rows: list[dict]) -> str | None:
    """How far noisy accuracy comes back when each reset group is retrained on clean examples
    only: the groups it returns most and least for (docs/method.md, Experiment 3)."""
    ends = {}
    for r in sorted(rows, key=lambda r: r["epoch"]):
        ends.setdefault(r["group"], {})[r["epoch"]] = r
    done = {g: (e[min(e)], e[max(e)]) for g, e in ends.items() if len(e) > 1}
    if not done:
        return None
    most = max(done, key=lambda g: done[g][1]["noisy_acc"])
    least = min(done, key=lambda g: done[g][1]["noisy_acc"])
    reset, end = done[most]
    text = (f"Retrained on clean examples only, {most} brings noisy accuracy back from "
            f"{num(reset['noisy_acc'])} at the reset to {num(end['noisy_acc'])} after "
            f"{end['epoch']} epochs")
    if least != most:
        reset, end = done[least]
        text += (f"; {least} ends at {num(end['noisy_acc'])} (from {num(reset['noisy_acc'])})")
    worst_clean = min(done.values(), key=lambda p: p[1]["clean_acc"])[1]["clean_acc"]
    return text + (f". Clean-train accuracy after retraining is {num(worst_clean)}"
                   + (" for every group." if num(worst_clean) == num(1.0) else " or higher."))


def _site_phrase(entry: dict, sites: list[str]) -> str:
    if entry.get("site_enrichment"):
        top = max(sites, key=lambda s: entry["site_enrichment"][s])
        return (f"relative to its width, {top} holds most of them "
                f"({num(entry['site_enrichment'][top])} times its share of channels)")
    top = max(sites, key=lambda s: entry["site_fraction"][s])
    return f"{top} holds the largest share of them ({num(entry['site_fraction'][top])})"


def _channels_phrase(entry: dict, kind: str) -> str:
    """How many channels flipping a group's fitted targets took, or why there is no number."""
    fitted = entry["count"] - entry.get("unfitted", 0)
    if not fitted:
        return f"the model fitted none of the {entry['count']} {kind} targets: nothing to flip"
    if entry["median_channels_flipped"] is None:
        return f"none of the {fitted} fitted {kind} targets flipped within the channel cap"
    return (f"flipping a {kind} target takes a median of {entry['median_channels_flipped']:g} "
            f"channels ({num(entry['flip_rate'])} of {fitted} flipped)")


def localization_finding(summary: dict) -> str | None:
    """Channels needed to flip a noisy vs a clean example, where the noisy examples' channels
    sit, and what the edits cost (docs/method.md, Experiment 4)."""
    groups = summary.get("groups", {})
    noisy, clean = groups.get("noisy"), groups.get("clean")
    if not noisy or not noisy["count"]:
        return None
    text = _channels_phrase(noisy, "noisy (memorized)")
    text = text[0].upper() + text[1:]
    if clean and clean["count"]:
        text += "; " + _channels_phrase(clean, "clean")
    if noisy["median_channels_flipped"] is None:
        return text + "."
    used = [s for s in summary["sites"] if noisy["site_fraction"][s] > 0]
    text += (f". The noisy targets' channels sit in {len(used)} of {len(summary['sites'])} "
             f"sites; {_site_phrase(noisy, summary['sites'])}.")
    base = summary.get("base")
    if base and noisy.get("edited_test_acc") is not None:
        text += (f" An edit costs on average {num(base['test_acc'] - noisy['edited_test_acc'])}"
                 f" test accuracy (unedited {num(base['test_acc'])}).")
    return text


def tied_share_finding(summary: dict) -> str | None:
    """On a tied-dropout run's localization: the share of zeroed channels (at tied sites) that
    are memorization channels and the target's own, against their share of all channels."""
    noisy = summary.get("groups", {}).get("noisy", {}).get("tied")
    if not noisy or not noisy["zeroed"]:
        return None
    return (f"Of the {noisy['zeroed']} channels zeroed at tied-dropout sites to flip noisy "
            f"examples, {num(noisy['memorization_share'])} are memorization channels (their "
            f"share of all channels there: {num(noisy['memorization_baseline'])}) and "
            f"{num(noisy['own_share'])} are the example's own (baseline "
            f"{num(noisy['own_baseline'])}).")


def comparison_finding(plain: dict, tied: dict) -> str:
    """The paper's tied-dropout headline on two final ``metrics.jsonl`` lines: a plain run's
    fit of its noisy labels against a tied run's with its memorization channels kept and
    dropped, and the generalization gaps (clean-train minus test accuracy)."""
    gap_plain = plain["clean_acc"] - plain["test_acc"]
    gap_drop = tied["clean_acc_drop"] - tied["test_acc_drop"]
    own, dropped = tied["noisy_acc"], tied["noisy_acc_drop"]
    text = (f"The plain run fits {num(plain['noisy_acc'])} of its flipped labels, test accuracy "
            f"{num(plain['test_acc'])}. The tied run fits {num(own)} with each example's own "
            f"memorization channels and {num(dropped)} with the memorization channels dropped, "
            f"test accuracy {num(tied['test_acc_drop'])}")
    if own - dropped >= 0.5:
        text += ": what it memorized sits in the memorization channels"
    return (text + f". Generalization gap (clean-train minus test accuracy): plain "
            f"{num(gap_plain)}, tied with the memorization channels dropped {num(gap_drop)}.")


def scores_finding(benchmark: list[dict]) -> str | None:
    """The signal that ranks the flipped labels best among those scoring every example (a
    signal computed for a subset, as channels_to_flip, is ranked on easier ground), and the
    combined memorization_score beside it (``scores/benchmark.csv`` rows)."""
    rows = [r for r in benchmark if r.get("auroc") not in (None, "")
            and not math.isnan(float(r["auroc"]))]
    if not rows:
        return None
    everyone = max(int(r["covered"]) for r in rows)
    rows = [r for r in rows if int(r["covered"]) == everyone]
    best = max(rows, key=lambda r: float(r["auroc"]))
    text = (f"Of {len(rows)} signals scoring all {everyone} examples, {best['method']} finds "
            f"the flipped labels best: AUROC {num(float(best['auroc']))}, average precision "
            f"{num(float(best['ap']))}")
    combined = next((r for r in rows if r["method"] == "memorization_score"), None)
    if combined and combined is not best:
        text += (f"; the combined memorization_score: AUROC {num(float(combined['auroc']))}, "
                 f"average precision {num(float(combined['ap']))}")
    return text + "."
