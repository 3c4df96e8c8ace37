"""Summary of a localize output: channels needed (noisy vs clean), where the critical channels
sit (per site), and what the edits cost in accuracy. Works on any existing ``localize.jsonl``.

A target the model never fitted (predicted otherwise before any channel was zeroed) is counted
apart as "unfitted" and left out of the flip rate and the channels needed: it says nothing about
where a memorized label is kept.

On a tied-dropout run, the zeroed channels at tied sites are split into generalization and
memorization channels, and among the memorization channels, the target's own (the ones its
training mask kept): docs/method.md (Experiment 5) expects memorized examples to be flipped
through their own memorization channels.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

import torch

from memkern.rundir.atomic import atomic_write_json
from memkern.report.figures.style import save_figure
from memkern.kernels.channel_mask_reference import generalization_channels, tied_mask_values

GROUPS = ("noisy", "clean")
ACCS = ("clean_acc", "noisy_acc", "test_acc")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def fitted(row: dict) -> bool:
    """The model predicted the target's label before any channel was zeroed."""
    return row.get("fitted", not (row["flipped"] and row["n_channels"] == 0))


def _tied_entry(rows: list[dict], tied: dict[str, dict]) -> dict:
    """Zeroed channels at tied sites: how many, the share that are memorization channels and the
    share that are the target's own, each beside its share among all channels of those sites
    (for own channels: the mean over targets of their own kept share)."""
    total = sum(t["channels"] for t in tied.values())
    zeroed = memorization = own = 0
    own_base = []
    for r in rows:
        kept = {s: tied_mask_values(torch.tensor([r["index"]]), mode="own", **t)[0]
                for s, t in tied.items()}
        gens = {s: generalization_channels(t["p_gen"], t["channels"]) for s, t in tied.items()}
        own_base.append(sum(float(k[gens[s]:].sum()) for s, k in kept.items()) / total)
        for s, c in r["channels"]:
            if s in tied:
                zeroed += 1
                memorization += c >= gens[s]
                own += c >= gens[s] and bool(kept[s][c])
    mem_base = sum(t["channels"] - generalization_channels(t["p_gen"], t["channels"])
                   for t in tied.values()) / total
    return {"zeroed": zeroed,
            "memorization_share": memorization / zeroed if zeroed else None,
            "memorization_baseline": mem_base,
            "own_share": own / zeroed if zeroed else None,
            "own_baseline": _mean(own_base)}


def summarize(rows: list[dict], *, site_order: Sequence[str] | None = None,
              base: dict[str, float] | None = None,
              site_widths: dict[str, int] | None = None,
              tied: dict[str, dict] | None = None) -> dict:
    """Per group (noisy / clean targets): count, unfitted count; over the fitted ones: flip rate,
    median and mean channels of the flipped ones, mean edited accuracies; per site: the fraction
    of each group's zeroed channels that sit there and, given ``site_widths`` (channels per
    site), that fraction over the site's share of all channels (1: zeroed in proportion to its
    width; above 1: favoured). ``base``: the unedited model's accuracies, for the cost.
    ``tied``: ``{site: {"channels", "seed", "p_gen", "p_mem"}}`` of the tied-dropout sites among
    the localized ones, for the memorization-channel shares (:func:`_tied_entry`)."""
    seen = [s for r in rows for s, _ in r["channels"]]
    sites = list(site_order) if site_order else sorted(set(seen))
    out: dict = {"examples": len(rows), "sites": sites, "base": base, "groups": {},
                 "site_widths": site_widths, "tied": tied}
    total_width = sum(site_widths[s] for s in sites) if site_widths else None
    for g in GROUPS:
        everyone = [r for r in rows if r["noisy"] == (g == "noisy")]
        rs = [r for r in everyone if fitted(r)]
        flipped = [r["n_channels"] for r in rs if r["flipped"]]
        zeroed = [s for r in rs for s, _ in r["channels"]]
        entry = {
            "count": len(everyone),
            "unfitted": len(everyone) - len(rs),
            "flip_rate": _mean([float(r["flipped"]) for r in rs]),
            "median_channels_flipped": statistics.median(flipped) if flipped else None,
            "mean_channels_flipped": _mean([float(v) for v in flipped]),
            "n_channels": [r["n_channels"] for r in rs],
            "flipped": [r["flipped"] for r in rs],
            "site_fraction": {s: (zeroed.count(s) / len(zeroed) if zeroed else 0.0) for s in sites},
            "mean_sites_per_example": _mean([float(len({s for s, _ in r["channels"]})) for r in rs
                                             if r["channels"]]),
        }
        if site_widths:
            entry["site_enrichment"] = {
                s: entry["site_fraction"][s] * total_width / site_widths[s] for s in sites}
        for a in ACCS:
            entry[f"edited_{a}"] = _mean([r[a] for r in rs if r[a] is not None])
        if tied:
            entry["tied"] = _tied_entry(rs, tied)
        out["groups"][g] = entry
    return out


def format_table(summary: dict) -> str:
    """A plain-text table of :func:`summarize`'s result."""
    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    base = summary.get("base") or {}
    lines = [f"{'targets':<8}{'count':>6}{'unfit':>6}{'flipped':>9}{'median ch':>11}{'mean ch':>9}"
             f"{'sites/ex':>9}{'clean acc':>11}{'noisy acc':>11}{'test acc':>10}"]
    for g, e in summary["groups"].items():
        lines.append(f"{g:<8}{e['count']:>6}{e.get('unfitted', 0):>6}{f(e['flip_rate']):>9}"
                     f"{f(e['median_channels_flipped'], 'g'):>11}{f(e['mean_channels_flipped'], '.1f'):>9}"
                     f"{f(e['mean_sites_per_example'], '.1f'):>9}{f(e['edited_clean_acc']):>11}"
                     f"{f(e['edited_noisy_acc']):>11}{f(e['edited_test_acc']):>10}")
    if base:
        lines.append(f"{'unedited':<8}{'':>12}{'':>9}{'':>11}{'':>9}{'':>9}{f(base['clean_acc']):>11}"
                     f"{f(base['noisy_acc']):>11}{f(base['test_acc']):>10}")
    noisy, clean = summary["groups"]["noisy"], summary["groups"]["clean"]
    widths = summary.get("site_widths")
    lines.append("share of zeroed channels per site (noisy / clean)"
                 + ("; over the site's share of all channels (noisy / clean):" if widths else ":"))
    for s in summary["sites"]:
        line = f"  {s:<24}{noisy['site_fraction'][s]:>7.3f}{clean['site_fraction'][s]:>8.3f}"
        if widths:
            line += (f"   {widths[s]:>5} ch {noisy['site_enrichment'][s]:>7.2f}"
                     f"{clean['site_enrichment'][s]:>8.2f}")
        lines.append(line)
    if summary.get("tied"):
        lines.append("tied-dropout sites: share of zeroed channels that are memorization channels "
                     "/ the target's own (baseline: their share of all channels)")
        for g, e in summary["groups"].items():
            t = e["tied"]
            lines.append(f"  {g:<8}{t['zeroed']:>5} zeroed   memorization "
                         f"{f(t['memorization_share'])}"
                         f" ({f(t['memorization_baseline'])})   own {f(t['own_share'])}"
                         f" ({f(t['own_baseline'])})")
    return "\n".join(lines)


def plot_summary(summary: dict, path: str | Path, *, max_channels: int | None = None) -> None:
    """Three panels (four on a tied run): histogram of channels needed (unflipped counted at
    the cap); where the zeroed channels sit, as each site's share of them over its share of all
    channels when the widths are known (1: in proportion to width); mean accuracies of the
    edited models (dashed: unedited). Noisy and clean targets differ by hatch as well as colour,
    and the legend sits above the panels, off the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memkern.report.figures.style import EXAMPLE_GROUPS

    groups = {g: summary["groups"][g] for g in GROUPS if g in summary["groups"]}
    tied = bool(summary.get("tied"))
    # Two by two: the report shows this figure at half a page's width beside another run's.
    fig, grid = plt.subplots(2, 2, figsize=(11, 8.5), layout="constrained")
    axes = list(grid.flat)
    top = max([max(e["n_channels"], default=0) for e in groups.values()] + [max_channels or 1])
    bins = range(0, top + 2)
    width = 0.4

    def bars(ax, k, g, xs, heights, **kw):
        colour, hatch, _, _ = EXAMPLE_GROUPS[g]
        ax.bar([x + (k - 0.5) * width for x in xs], heights, width, color=colour, alpha=0.75,
               hatch=hatch, edgecolor="black", linewidth=0.6, **kw)

    for g, e in groups.items():
        colour, hatch, _, _ = EXAMPLE_GROUPS[g]
        rate = 0 if e["flip_rate"] is None else e["flip_rate"]
        axes[0].hist(e["n_channels"], bins=bins, alpha=0.55, color=colour, hatch=hatch,
                     edgecolor="black", linewidth=0.6,
                     label=f"{g} targets (n={e['count']}, flipped {rate:.0%})")
    axes[0].set(xlabel="channels zeroed to flip (unflipped: at the cap)",
                ylabel="targets (count)", title="channels needed to flip an example")
    sites = summary["sites"]
    normalized = bool(summary.get("site_widths"))
    key = "site_enrichment" if normalized else "site_fraction"
    for k, (g, e) in enumerate(groups.items()):
        bars(axes[1], k, g, range(len(sites)), [e[key][s] for s in sites])
    if normalized:
        axes[1].axhline(1.0, color="black", linestyle="dotted", linewidth=1.5,
                        label="1: zeroed in proportion to the site's width")
    axes[1].set_xticks(range(len(sites)), sites, rotation=45, ha="right", fontsize=8)
    axes[1].set(xlabel="site", ylabel="share of zeroed channels / share of all channels"
                if normalized else "share of zeroed channels (fraction)",
                title="where the critical channels sit" + (" (width-normalized)"
                                                           if normalized else ""))
    for k, (g, e) in enumerate(groups.items()):
        bars(axes[2], k, g, range(3), [e[f"edited_{a}"] or 0.0 for a in ACCS])
    base = summary.get("base")
    if base:
        for i, a in enumerate(ACCS):
            axes[2].hlines(base[a], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                           label="unedited model" if i == 0 and not normalized else None)
    axes[2].set_xticks(range(3), ["clean train", "noisy train", "test"])
    axes[2].set(xlabel="training / test set", ylabel="accuracy of the edited model (fraction)",
                ylim=(0, 1.05), title="accuracy after the edit (mean over targets)")
    if tied:
        _plot_tied_shares(axes[3], groups, bars)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        more, names = ax.get_legend_handles_labels()
        handles += more
        labels += names
    if base:
        handles.append(matplotlib.lines.Line2D([], [], color="k", linestyle="dashed"))
        labels.append("unedited model (accuracy panel)" if normalized else "unedited model")
    if tied:
        fig.legend(handles, labels, loc="outside upper center", ncol=2, fontsize=9)
    else:  # the empty fourth panel holds the legend
        axes[3].axis("off")
        axes[3].legend(handles, labels, loc="center", fontsize=10)
    save_figure(fig, path, dpi=110)


def _plot_tied_shares(ax, groups: dict, bars) -> None:
    """Share of zeroed channels (at tied sites) that are memorization / the target's own
    channels, per group; black ticks: their share among all channels there."""
    kinds = (("memorization", "memorization channels"), ("own", "target's own channels"))
    for k, (g, e) in enumerate(groups.items()):
        t = e["tied"]
        xs = [i + (k - 0.5) * 0.4 for i in range(len(kinds))]
        bars(ax, k, g, range(len(kinds)), [t[f"{kind}_share"] or 0.0 for kind, _ in kinds])
        ax.hlines([t[f"{kind}_baseline"] or 0.0 for kind, _ in kinds], [x - 0.2 for x in xs],
                  [x + 0.2 for x in xs], colors="k", linewidth=2.5,
                  label="share among all channels at tied sites" if k == 0 else None)
    ax.set_xticks(range(len(kinds)), [label for _, label in kinds])
    ax.set(xlabel="kind of channel", ylabel="share of zeroed channels (fraction)",
           ylim=(0, 1.05), title="tied dropout: which channels flip an example")


SUMMARY_KEYS = ("examples", "sites", "groups")  # what marks a summary as memkern's
LEGACY_SUMMARY = "localize_summary.json"  # the run's summary before it was named after its output


def summary_paths(out: str | Path) -> tuple[Path, Path]:
    """The summary and the figure of localize output ``out``, named after it: ``X.jsonl`` ->
    ``X.summary.json``, ``X.png`` (never a fixed name, so outputs in one folder keep theirs)."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") and out.name != ".jsonl" \
        else out.name
    return out.with_name(f"{stem}.summary.json"), out.with_name(f"{stem}.png")


def require_summary_outputs(out: str | Path) -> None:
    """The summary and figure of ``out`` are absent or memkern's (memkern.rundir.ownership)."""
    from memkern.rundir.ownership import require_figure_outputs, require_json_output

    summary, figure = summary_paths(out)
    require_json_output(summary, keys=SUMMARY_KEYS, what="a localization summary")
    require_figure_outputs(figure)


def write_summary(rows: list[dict], out: str | Path, *, site_order: Sequence[str] | None = None,
                  base: dict[str, float] | None = None, site_widths: dict[str, int] | None = None,
                  max_channels: int | None = None, tied: dict[str, dict] | None = None) -> dict:
    """The summary (JSON) and figure (PNG) of localize output ``out``, at
    :func:`summary_paths`; returns the summary."""
    summary = summarize(rows, site_order=site_order, base=base, site_widths=site_widths,
                        tied=tied)
    summary_path, figure = summary_paths(out)
    atomic_write_json(summary_path, summary)
    plot_summary(summary, figure, max_channels=max_channels)
    return summary
