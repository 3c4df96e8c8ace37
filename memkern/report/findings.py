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
    """An accuracy, share or ratio as the report prints it: two decimals, more (up to four)
    where two would print a value that is not exactly 0 or 1 as 0.00 or 1.00; "n/a" when
    undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return separated([value], low=2, high=4)[0]


def separated(values: list[float], *, low: int = 2, high: int = 6) -> list[str]:
    """``values`` to be compared with each other, all with the same decimals: the fewest (from
    ``low`` to ``high``) that print different values differently and no value short of 0 or 1
    as 0 or 1 (an AUROC of 0.9996 is not "1.00")."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    for digits in range(low, high + 1):
        text = {v: f"{v:.{digits}f}" for v in finite}
        bounded = all(float(t) not in (0.0, 1.0) or v in (0.0, 1.0) for v, t in text.items())
        if bounded and len(set(text.values())) == len(text):
            break
    return ["n/a" if v is None or math.isnan(float(v)) else f"{float(v):.{digits}f}"
            for v in values]


MEMORIZED = 0.5  # a run memorized when it fits at least this share of its flipped labels


def memorization_caveat(last: dict) -> str | None:
    """The sentence every memorization finding starts with when the run (final metrics line
    ``last``; own masks on a tied run) fits fewer than ``MEMORIZED`` of its flipped labels."""
    noisy = last.get("noisy_acc")
    if noisy is None or (isinstance(noisy, float) and math.isnan(noisy)) or noisy >= MEMORIZED:
        return None
    return (f"No memorization to find: the model fits only {num(noisy)} of its flipped labels "
            f"(below {MEMORIZED}), so what follows describes a model that did not memorize.")


def caveated(text: str | None, last: dict) -> str | None:
    """``text`` opening with a short form of :func:`memorization_caveat` when the run did not
    memorize."""
    if not text or memorization_caveat(last) is None:
        return text
    return (f"No memorization to find (the model fits {num(last['noisy_acc'])} of its flipped "
            f"labels): {text}")


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


def accounting_finding(summary: list[dict], *, memorized: str = "noisy",
                       kind: str = "example") -> str | None:
    """At the epoch where the noisy/clean summed-gradient norm ratio peaks
    (:func:`accounting_ratio_peak`, the headline's number): that ratio, the ratio of their
    mean per-example norms, and the sign of the clean-noisy cosine per group. ``memorized`` and
    ``kind`` name the split and its items (a text run: "planted" "window")."""
    epochs = _by_epoch(summary)
    peak = accounting_ratio_peak(summary)
    if peak is None:
        return None
    epoch, ratio = peak
    rows = epochs[epoch]
    groups = [g for g in rows if g != TOTAL]
    whole = rows.get(TOTAL) or rows[groups[0]]
    text = (f"The {memorized} {kind}s' summed gradient has at most {num(ratio)} times the norm "
            f"of the clean {kind}s' (at epoch {epoch}, of {len(epochs)} epochs accounted)")
    if whole.get("clean_mean") and float(whole["clean_mean"]) > 0:
        per_example = float(whole["noisy_mean"]) / float(whole["clean_mean"])
        text += (f"; there a {memorized} {kind}'s own gradient is {num(per_example)} times a "
                 f"clean one's")
    cosines = [float(rows[g]["cosine"]) for g in groups]
    negative = [g for g, c in zip(groups, cosines) if c < 0]
    text += (f". The cosine between the clean and {memorized} sums is "
             f"{num(float(whole['cosine']))} "
             f"over all layers, negative in {len(negative)} of {len(groups)} groups"
             + (f" ({', '.join(negative)})." if negative else "."))
    return text


def accounting_ratio_peak(summary: list[dict]) -> tuple[int, float] | None:
    """(epoch, noisy/clean summed-gradient norm over all layers) where the ratio is largest:
    the one definition of "the ratio" that the headline and the finding both quote."""
    best = None
    for epoch, rows in _by_epoch(summary).items():
        whole = rows.get(TOTAL) or next(iter(rows.values()))
        if whole and float(whole["clean_norm"]) > 0:
            ratio = float(whole["noisy_norm"]) / float(whole["clean_norm"])
            if best is None or ratio > best[1]:
                best = (epoch, ratio)
    return best


TEST_HOLDS = 0.02  # a rewinding counts only if test accuracy drops at most this much
NOISY_DROPS = 0.05  # ... and noisy accuracy by more than this
REWIND_RULE = (f"test accuracy may drop at most {TEST_HOLDS}, noisy accuracy must drop more "
               f"than {NOISY_DROPS}")


def _baseline(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["group"] == BASELINE), None)


def rewind_critical(rows: list[dict]) -> dict | None:
    """The rewound configuration that most lowers noisy accuracy under :data:`REWIND_RULE`
    (test accuracy holds within ``TEST_HOLDS`` of the final model's, noisy accuracy drops by
    more than ``NOISY_DROPS``); None when none qualifies or there is no final-model row: a
    rewinding that destroys generalization undoes no memorization in particular."""
    base = _baseline(rows)
    if base is None:
        return None
    holding = [r for r in rows if r["group"] != BASELINE
               and r["test_acc"] >= base["test_acc"] - TEST_HOLDS
               and r["noisy_acc"] < base["noisy_acc"] - NOISY_DROPS]
    return min(holding, key=lambda r: (r["noisy_acc"], r["epoch"]), default=None)


def rewind_finding(rows: list[dict]) -> str | None:
    """The rewinding that undoes most of the memorization under :data:`REWIND_RULE`
    (:func:`rewind_critical`), or, when none qualifies, the largest drop and its test cost;
    what rewinding the last group to the earliest epoch does; and from which epoch on no
    single group's rewinding matters (docs/method.md, Experiment 2)."""
    base = _baseline(rows)
    configs = [r for r in rows if r["group"] != BASELINE]
    if base is None or not configs:
        return None
    critical = rewind_critical(rows)
    final = f"final model: noisy {num(base['noisy_acc'])}, test {num(base['test_acc'])}"
    if critical:
        text = (f"Rewinding {critical['group']} to epoch {critical['epoch']} drops noisy "
                f"accuracy to {num(critical['noisy_acc'])} while test accuracy stays "
                f"{num(critical['test_acc'])} ({final}; rule: {REWIND_RULE}).")
    else:
        worst = min(configs, key=lambda r: (r["noisy_acc"], r["epoch"]))
        text = (f"No single group's rewinding lowers noisy accuracy by more than {NOISY_DROPS} "
                f"while test accuracy stays within {TEST_HOLDS} of the final model's ({final}); "
                f"the largest drop, {worst['group']} to epoch {worst['epoch']} (noisy "
                f"{num(worst['noisy_acc'])}), takes test accuracy to {num(worst['test_acc'])}.")
    first = min(r["epoch"] for r in configs)
    last = [r for r in configs if r["epoch"] == first][-1]
    if critical is None or last["group"] != critical["group"]:
        text += (f" Rewinding the last group, {last['group']}, to epoch {first} leaves noisy "
                 f"accuracy at {num(last['noisy_acc'])} (test {num(last['test_acc'])}).")
    safe = [e for e in sorted({r["epoch"] for r in configs})
            if all(r["noisy_acc"] >= base["noisy_acc"] - NOISY_DROPS
                   for r in configs if r["epoch"] >= e)]
    if safe and safe[0] > first:
        text += (f" From epoch {safe[0]} on, rewinding any single group keeps noisy "
                 f"accuracy within {NOISY_DROPS} of the final model's.")
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


def flipped_count(entry: dict) -> int:
    """How many of a group's fitted targets flipped (a count, from the summary's rate)."""
    fitted = entry["count"] - entry.get("unfitted", 0)
    return round((entry["flip_rate"] or 0.0) * fitted)


def _channels_phrase(entry: dict, kind: str) -> str:
    """How many channels flipping a group's fitted targets took, or why there is no number."""
    fitted = entry["count"] - entry.get("unfitted", 0)
    if not fitted:
        return f"the model fitted none of the {entry['count']} {kind} targets: nothing to flip"
    if entry["median_channels_flipped"] is None:
        return f"none of the {fitted} fitted {kind} targets flipped within the channel cap"
    return (f"flipping a {kind} target takes a median of {entry['median_channels_flipped']:g} "
            f"channels ({flipped_count(entry)} of {fitted} flipped)")


def localization_finding(summary: dict) -> str | None:
    """Channels needed to flip a noisy vs a clean example, where the noisy examples' channels
    sit, and what the edits cost (docs/method.md, Experiment 4)."""
    groups = summary.get("groups", {})
    noisy, clean = groups.get("noisy"), groups.get("clean")
    if not noisy or not noisy["count"]:
        if not clean or not clean["count"]:
            return None
        text = _channels_phrase(clean, "clean")
        return text[0].upper() + text[1:] + " (no noisy target was asked for)."
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


def _enrichment_phrase(tied: dict) -> str:
    ci = tied.get("enrichment_ci")
    return (f"{num(tied['enrichment'])} times as often"
            + (f" (95% interval {num(ci[0])} to {num(ci[1])} over {tied['targets']} targets, "
               f"bootstrap)" if ci else ""))


def tied_share_finding(summary: dict) -> str | None:
    """On a tied-dropout run's localization: how often the channels zeroed at tied sites are
    the target's own memorization channels, against their share of the channels active for
    that target under its own mask (the others are zero for it already), for noisy targets and
    for clean ones (docs/method.md, Experiment 5)."""
    groups = summary.get("groups", {})
    noisy = (groups.get("noisy") or {}).get("tied")
    if not noisy or noisy.get("enrichment") is None:
        return None
    text = (f"Of the {noisy['active']} channels zeroed at tied-dropout sites to flip noisy "
            f"examples, {noisy['own']} ({num(noisy['own_share'])}) are the example's own "
            f"memorization channels, against {num(noisy['active_baseline'])} among the channels "
            f"active for it (its generalization channels and its own kept ones): "
            f"{_enrichment_phrase(noisy)}")
    clean = (groups.get("clean") or {}).get("tied")
    if clean and clean.get("enrichment") is not None:
        text += (f"; for clean examples {num(clean['own_share'])} against "
                 f"{num(clean['active_baseline'])}: {_enrichment_phrase(clean)}")
    return text + "."


def comparison_finding(plain: dict, tied: dict) -> str:
    """The paper's tied-dropout headline on two final ``metrics.jsonl`` lines: a plain run's
    fit of its noisy labels against a tied run's with its memorization channels kept and
    dropped, and the generalization gaps (clean-train minus test accuracy)."""
    gap_plain = plain["clean_acc"] - plain["test_acc"]
    epochs = (f" (the plain run trained {plain['epoch']} epochs, the tied run {tied['epoch']})"
              if plain.get("epoch") != tied.get("epoch") else "")
    gap_drop = tied["clean_acc_drop"] - tied["test_acc_drop"]
    own, dropped = tied["noisy_acc"], tied["noisy_acc_drop"]
    text = (f"The plain run fits {num(plain['noisy_acc'])} of its flipped labels, test accuracy "
            f"{num(plain['test_acc'])}. The tied run fits {num(own)} with each example's own "
            f"memorization channels and {num(dropped)} with the memorization channels dropped, "
            f"test accuracy {num(tied['test_acc_drop'])}")
    if own - dropped >= 0.5:
        text += ": what it memorized sits in the memorization channels"
    return (text + f". Generalization gap (clean-train minus test accuracy): plain "
            f"{num(gap_plain)}, tied with the memorization channels dropped {num(gap_drop)}"
            f"{epochs}.")


def scores_finding(benchmark: list[dict]) -> str | None:
    """The signal that ranks the flipped labels best among those scoring every example (a
    signal computed for a subset, as channels_to_flip, is ranked on easier ground), the
    runner-up and the combined memorization_score beside it (``scores/benchmark.csv`` rows),
    with as many digits as it takes to tell their AUROCs apart."""
    rows = [r for r in benchmark if r.get("auroc") not in (None, "")
            and not math.isnan(float(r["auroc"]))]
    if not rows:
        return None
    everyone = max(int(r["covered"]) for r in rows)
    rows = sorted((r for r in rows if int(r["covered"]) == everyone),
                  key=lambda r: -float(r["auroc"]))
    quoted = rows[:2] + [r for r in rows[2:] if r["method"] == "memorization_score"]
    auroc = dict(zip((r["method"] for r in quoted),
                     separated([float(r["auroc"]) for r in quoted])))
    ap = dict(zip((r["method"] for r in quoted), separated([float(r["ap"]) for r in quoted])))
    best = quoted[0]
    text = (f"Of {len(rows)} signals scoring all {everyone} examples, {best['method']} finds "
            f"the flipped labels best: AUROC {auroc[best['method']]}, average precision "
            f"{ap[best['method']]}")
    for r in quoted[1:]:
        what = "the combined memorization_score" if r["method"] == "memorization_score" else (
            f"next, {r['method']}")
        text += f"; {what}: AUROC {auroc[r['method']]}, average precision {ap[r['method']]}"
    return text + "."
