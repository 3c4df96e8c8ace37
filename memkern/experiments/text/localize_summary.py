"""Summary of a text run's localize output: per group of targets (canaries by reps, duplicated
paragraphs), how many were extracted, how many the edit stopped and with how many neurons,
and what the edit cost (the other canaries' extraction, held-out perplexity).

Only targets extracted before any edit ("fitted") count toward the flip rate and the costs:
an insert the model never memorized says nothing about where it is kept. The perplexity rise
is ``2^(bpb_after - bpb_before) - 1`` (bits per byte; perplexity per byte).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from memkern.experiments.localize.summary import fitted, mean_or_none, summary_paths
from memkern.rundir.atomic import atomic_write_json


def group_of(row: dict) -> str:
    """``canaries x64`` (a canary planted 64 times) or ``paragraphs x8``."""
    kind = "canaries" if row.get("kind") == "canary" else "paragraphs"
    return f"{kind} x{row['reps']}"


def _order(name: str) -> tuple[bool, int]:
    kind, _, reps = name.partition(" x")
    return kind != "canaries", -int(reps)


def _entry(rows: list[dict], total: int | None, sites: list[str]) -> dict:
    done = [r for r in rows if fitted(r)]
    flipped = [r for r in done if r["flipped"]]
    zeroed = [s for r in done for s, _ in r["channels"]]

    def mean_of(key: str, of: list[dict]) -> float | None:
        return mean_or_none([float(r[key]) for r in of if r.get(key) is not None])

    rise = [2.0 ** (r["heldout_bpb_after"] - r["heldout_bpb_before"]) - 1.0 for r in done]
    others = [r["others_extracted_after"] - r["others_extracted_before"] for r in done
              if "others_extracted_after" in r]
    return {
        "count": len(rows), "extracted": len(done), "flipped": [r["flipped"] for r in done],
        "flip_rate": mean_or_none([float(r["flipped"]) for r in done]),
        "n_channels": [r["n_channels"] for r in done],
        "median_channels_flipped": statistics.median([r["n_channels"] for r in flipped])
        if flipped else None,
        "share_flipped": mean_or_none([r["n_channels"] / total for r in flipped]) if total else None,
        "exposure_before": mean_of("exposure_before", done),
        "exposure_after": mean_of("exposure_after", done),
        "suffix_acc_before": mean_of("suffix_acc_before", done),
        "suffix_acc_after": mean_of("suffix_acc_after", done),
        "others_change": mean_or_none(others), "perplexity_rise": mean_or_none(rise),
        "perplexity_rise_max": max(rise) if rise else None,
        "site_fraction": {s: (zeroed.count(s) / len(zeroed) if zeroed else 0.0) for s in sites},
    }


def summarize_text(rows: list[dict], *, site_order: Sequence[str] | None = None,
                   site_widths: dict[str, int] | None = None, settings: dict | None = None,
                   selection: str | None = None) -> dict:
    """Per group (:func:`group_of`) and over all targets ("all"): ``count``, ``extracted``
    (fitted), and over the extracted ones the flip rate, channels needed (count; ``share``:
    of all localized channels), mean exposure or suffix accuracy before/after, the mean change
    of the other canaries' extraction (fraction, after - before) and the mean and largest
    held-out perplexity rise (fraction)."""
    sites = list(site_order) if site_order else sorted({s for r in rows for s, _ in r["channels"]})
    total = sum(site_widths[s] for s in sites) if site_widths else None
    names = sorted({group_of(r) for r in rows}, key=_order)
    groups = {g: _entry([r for r in rows if group_of(r) == g], total, sites) for g in names}
    if len(groups) > 1:
        groups["all"] = _entry(rows, total, sites)
    return {"text": True, "examples": len(rows), "sites": sites, "groups": groups,
            "site_widths": site_widths, "total_channels": total, "settings": settings,
            "selection": selection}


def format_text_table(summary: dict) -> str:
    """A plain-text table of :func:`summarize_text`'s result."""
    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    s = summary.get("settings") or {}
    lines = []
    if s:
        lines.append(f"{s['method']} on {s['checkpoint']}, {s['ref_batch']} reference windows, at "
                     f"most {s['max_channels']} of {summary.get('total_channels')} channels, "
                     f"seed {s['seed']}" + (f"; targets: {summary['selection']}"
                                            if summary.get("selection") else ""))
    lines.append(f"{'targets':<16}{'count':>6}{'extr.':>6}{'stopped':>10}{'median ch':>10}"
                 f"{'share':>8}{'exposure':>14}{'others':>8}{'ppl':>8}")
    for g, e in summary["groups"].items():
        share = "-" if e["share_flipped"] is None else f"{100 * e['share_flipped']:.2f}%"
        if e["exposure_before"] is not None:
            own = f"{f(e['exposure_before'], '.1f')}->{f(e['exposure_after'], '.1f')}"
        elif e["suffix_acc_before"] is not None:
            own = f"{f(e['suffix_acc_before'])}->{f(e['suffix_acc_after'])} acc"
        else:
            own = "-"
        others = "-" if e["others_change"] is None else f"{100 * e['others_change']:+.1f}"
        ppl = "-" if e["perplexity_rise"] is None else f"{100 * e['perplexity_rise']:+.2f}%"
        lines.append(f"{g:<16}{e['count']:>6}{e['extracted']:>6}"
                     f"{sum(e['flipped']):>5} of {len(e['flipped']):<3}"
                     f"{f(e['median_channels_flipped'], 'g'):>10}{share:>8}{own:>14}{others:>8}"
                     f"{ppl:>8}")
    lines.append("extr.: extracted before the edit (the targets counted); stopped: greedy decoding "
                 "no longer gives the secret; share: of all localized channels; exposure in bits; "
                 "others: change of the other canaries' extraction (points); ppl: held-out "
                 "perplexity rise")
    return "\n".join(lines)


def plot_text_summary(summary: dict, path: str | Path) -> None:
    """Two panels: channels zeroed per extracted target by group (stopped: filled, not: open,
    at the cap), and each group's cost: held-out perplexity rise against the change of the
    other canaries' extraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memkern.report.figures.style import WIDTH_IN, save_png

    groups = {g: e for g, e in summary["groups"].items() if g != "all"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH_IN, 3.4), layout="constrained")
    markers = "osD^v<>p"
    for k, (g, e) in enumerate(groups.items()):
        ys = e["n_channels"]
        stopped = e["flipped"]
        left.scatter([k] * sum(stopped), [y for y, s in zip(ys, stopped) if s],
                     marker=markers[k % len(markers)], color="tab:red", alpha=0.7,
                     label="stopped" if k == 0 else None)
        left.scatter([k] * (len(ys) - sum(stopped)), [y for y, s in zip(ys, stopped) if not s],
                     marker=markers[k % len(markers)], facecolors="none", edgecolors="black",
                     label="still extracted (at the cap)" if k == 0 else None)
        if e["perplexity_rise"] is not None:
            right.scatter([100 * e["perplexity_rise"]],
                          [100 * (e["others_change"] or 0.0)], marker=markers[k % len(markers)],
                          s=60, color="tab:blue", edgecolors="black", label=g)
    left.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=8)
    left.set(ylabel="channels zeroed (count)", title="neurons needed per target")
    if any(e["n_channels"] for e in groups.values()):
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no target was extracted\nbefore the edit", ha="center",
                  va="center", transform=left.transAxes)
    right.axhline(0.0, color="black", linewidth=0.8, linestyle="dotted")
    right.set(xlabel="held-out perplexity rise (%)",
              ylabel="other canaries extracted (points)", title="cost of the edit (mean)")
    if any(e["perplexity_rise"] is not None for e in groups.values()):
        right.legend(fontsize=8)
    save_png(fig, path)


def write_text_summary(rows: list[dict], out: str | Path, **kw) -> dict:
    """The summary (JSON) and figure (PNG) of text localize output ``out`` at
    :func:`memkern.experiments.localize.summary.summary_paths`; returns the summary."""
    summary = summarize_text(rows, **kw)
    summary_path, figure = summary_paths(out)
    atomic_write_json(summary_path, summary)
    plot_text_summary(summary, figure)
    return summary
