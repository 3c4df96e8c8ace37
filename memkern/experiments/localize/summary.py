"""Summary of a localize output: channels needed (noisy vs clean), where the critical channels
sit (per site), and what the edits cost in accuracy. Works on any existing ``localize.jsonl``.

A target the model never fitted (predicted otherwise before any channel was zeroed) is counted
apart as "unfitted" and left out of the flip rate and the channels needed: it says nothing about
where a memorized label is kept.

On a tied-dropout run, the zeroed channels at tied sites are split into the target's own
memorization channels (the ones its training mask kept) and the rest: docs/method.md
(Experiment 5) expects memorized examples to be flipped through their own memorization channels.
The baseline is the own channels' share of the channels *active* for the target under its own
mask (generalization channels and its own kept ones), since the others are zero for it already:
the enrichment (observed share over that baseline) comes with a bootstrap interval over targets.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from memkern.rundir.atomic import atomic_write_json
from memkern.kernels.channel_mask_reference import generalization_channels, tied_mask_values

GROUPS = ("noisy", "clean")
ACCS = ("clean_acc", "noisy_acc", "test_acc")


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def fitted(row: dict) -> bool:
    """The model predicted the target's label before any channel was zeroed."""
    return row.get("fitted", not (row["flipped"] and row["n_channels"] == 0))


BOOTSTRAP = 2000  # resamples of the targets for the enrichment's confidence interval
CONFIDENCE = 0.95


def _tied_counts(row: dict, tied: dict[str, dict]) -> tuple[int, int, float, int]:
    """One target's zeroed channels at tied sites: (active zeroed, own zeroed, own expected,
    inactive zeroed). Under the target's own mask only its generalization channels and its own
    kept memorization channels are active, so greedy can change the target only through
    those; "own expected" is what a random pick among the active channels of the same sites
    would give: the sum over the zeroed channels of the own channels' share of the channels
    active for the target at that site."""
    kept = {s: tied_mask_values(torch.tensor([row["index"]]), mode="own", **t)[0].bool()
            for s, t in tied.items()}
    gens = {s: generalization_channels(t["p_gen"], t["channels"]) for s, t in tied.items()}
    own_of_active = {s: float(k[gens[s]:].sum()) / max(float(k.sum()), 1.0)
                     for s, k in kept.items()}
    active = own = inactive = 0
    expected = 0.0
    for s, c in row["channels"]:
        if s not in tied:
            continue
        if not kept[s][c]:
            inactive += 1
            continue
        active += 1
        own += c >= gens[s]
        expected += own_of_active[s]
    return active, own, expected, inactive


def _tied_entry(rows: list[dict], tied: dict[str, dict]) -> dict:
    """Zeroed channels at tied sites: how many were active for their target, the share of
    those that are the target's own memorization channels (``own_share``), the share a random
    pick among each target's active channels would give (``active_baseline``), their ratio
    (``enrichment``, above 1: own channels favoured) and its ``CONFIDENCE`` interval from
    ``BOOTSTRAP`` resamples of the targets (seeded: the same summary every time)."""
    counts = np.array([_tied_counts(r, tied) for r in rows], dtype=np.float64).reshape(-1, 4)
    active, own, expected, inactive = counts.sum(0)
    entry = {"zeroed": int(active + inactive), "active": int(active), "inactive": int(inactive),
             "own": int(own), "targets": int((counts[:, 0] > 0).sum()),
             "own_share": own / active if active else None,
             "active_baseline": expected / active if active else None,
             "enrichment": own / expected if expected else None, "enrichment_ci": None}
    if expected and len(rows) > 1:
        picks = np.random.default_rng(0).integers(0, len(rows), (BOOTSTRAP, len(rows)))
        own_b, expected_b = counts[picks, 1].sum(1), counts[picks, 2].sum(1)
        ratios = own_b[expected_b > 0] / expected_b[expected_b > 0]
        tail = (1 - CONFIDENCE) / 2
        entry["enrichment_ci"] = [float(np.quantile(ratios, tail)),
                                  float(np.quantile(ratios, 1 - tail))]
    return entry


def summarize(rows: list[dict], *, site_order: Sequence[str] | None = None,
              base: dict[str, float] | None = None,
              site_widths: dict[str, int] | None = None,
              tied: dict[str, dict] | None = None, settings: dict | None = None,
              selection: str | None = None) -> dict:
    """Per group (noisy / clean targets): count, unfitted count; over the fitted ones: flip rate,
    median and mean channels of the flipped ones, mean edited accuracies; per site: the fraction
    of each group's zeroed channels that sit there and, given ``site_widths`` (channels per
    site), that fraction over the site's share of all channels (1: zeroed in proportion to its
    width; above 1: favoured). ``base``: the unedited model's accuracies, for the cost.
    ``tied``: ``{site: {"channels", "seed", "p_gen", "p_mem"}}`` of the tied-dropout sites among
    the localized ones, for the own-channel enrichment (:func:`_tied_entry`). ``settings``:
    what the lines were computed with (:func:`memkern.experiments.localize.settings.localize_settings`);
    ``selection``: the targets summarized, in words (``noisy, at most 8``)."""
    seen = [s for r in rows for s, _ in r["channels"]]
    sites = list(site_order) if site_order else sorted(set(seen))
    out: dict = {"examples": len(rows), "sites": sites, "base": base, "groups": {},
                 "site_widths": site_widths, "tied": tied, "settings": settings,
                 "selection": selection}
    total_width = sum(site_widths[s] for s in sites) if site_widths else None
    for g in GROUPS:
        everyone = [r for r in rows if r["noisy"] == (g == "noisy")]
        if not everyone:  # not asked for: no row of zeros
            continue
        rs = [r for r in everyone if fitted(r)]
        flipped = [r["n_channels"] for r in rs if r["flipped"]]
        zeroed = [s for r in rs for s, _ in r["channels"]]
        entry = {
            "count": len(everyone),
            "unfitted": len(everyone) - len(rs),
            "flip_rate": mean_or_none([float(r["flipped"]) for r in rs]),
            "median_channels_flipped": statistics.median(flipped) if flipped else None,
            "mean_channels_flipped": mean_or_none([float(v) for v in flipped]),
            "n_channels": [r["n_channels"] for r in rs],
            "flipped": [r["flipped"] for r in rs],
            "site_fraction": {s: (zeroed.count(s) / len(zeroed) if zeroed else 0.0) for s in sites},
            "mean_sites_per_example": mean_or_none(
                [float(len({s for s, _ in r["channels"]})) for r in rs if r["channels"]]),
        }
        if site_widths:
            entry["site_enrichment"] = {
                s: entry["site_fraction"][s] * total_width / site_widths[s] for s in sites}
        for a in ACCS:
            entry[f"edited_{a}"] = mean_or_none([r[a] for r in rs if r[a] is not None])
        if tied:
            entry["tied"] = _tied_entry(rs, tied)
        out["groups"][g] = entry
    return out


def flipped_text(entry: dict) -> str:
    """``"5 of 6"``: flipped targets of the fitted ones (a count, not a rate)."""
    return f"{sum(entry['flipped'])} of {len(entry['flipped'])}"


def enrichment_text(tied: dict) -> str:
    """``"1.83x (95% CI 1.61-2.07)"``, or "-" when nothing was zeroed at tied sites."""
    if tied.get("enrichment") is None:
        return "-"
    ci = tied.get("enrichment_ci")
    return f"{tied['enrichment']:.2f}x" + (
        f" ({CONFIDENCE:.0%} CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def settings_text(summary: dict) -> str | None:
    """What the lines were computed with and which targets were asked for, in one line."""
    s = summary.get("settings")
    if not s:
        return None
    text = (f"{s['method']} on {s['checkpoint']}, reference batch {s['ref_batch']}, at most "
            f"{s['max_channels']} channels, eot {s['eot']}, seed {s['seed']}")
    return text + (f"; targets: {summary['selection']}" if summary.get("selection") else "")


def format_table(summary: dict) -> str:
    """A plain-text table of :func:`summarize`'s result (groups with targets only)."""
    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    groups = summary["groups"]
    base = summary.get("base") or {}
    lines = [settings_text(summary)] if summary.get("settings") else []
    lines.append(f"{'targets':<8}{'count':>6}{'unfit':>6}{'flipped':>10}{'median ch':>11}"
                 f"{'mean ch':>9}{'sites/ex':>9}{'clean acc':>11}{'noisy acc':>11}{'test acc':>10}")
    for g, e in groups.items():
        lines.append(f"{g:<8}{e['count']:>6}{e.get('unfitted', 0):>6}{flipped_text(e):>10}"
                     f"{f(e['median_channels_flipped'], 'g'):>11}{f(e['mean_channels_flipped'], '.1f'):>9}"
                     f"{f(e['mean_sites_per_example'], '.1f'):>9}{f(e['edited_clean_acc']):>11}"
                     f"{f(e['edited_noisy_acc']):>11}{f(e['edited_test_acc']):>10}")
    if base:
        lines.append(f"{'unedited':<8}{'':>12}{'':>10}{'':>11}{'':>9}{'':>9}{f(base['clean_acc']):>11}"
                     f"{f(base['noisy_acc']):>11}{f(base['test_acc']):>10}")
    widths = summary.get("site_widths")
    names = " / ".join(groups)
    lines.append(f"share of zeroed channels per site ({names})"
                 + (f"; over the site's share of all channels ({names}):" if widths else ":"))
    for s in summary["sites"]:
        line = f"  {s:<24}" + "".join(f"{e['site_fraction'][s]:>8.3f}" for e in groups.values())
        if widths:
            line += f"   {widths[s]:>5} ch" + "".join(f"{e['site_enrichment'][s]:>8.2f}"
                                                    for e in groups.values())
        lines.append(line)
    if summary.get("tied"):
        lines.append("tied-dropout sites: zeroed channels that are the target's own memorization "
                     "channels, against their share of the channels active for the target "
                     "(its own mask)")
        for g, e in groups.items():
            t = e["tied"]
            lines.append(f"  {g:<8}{t['own']:>5} of {t['active']:<5} own {f(t['own_share'])}"
                         f"  baseline {f(t['active_baseline'])}  enrichment {enrichment_text(t)}"
                         + (f"  ({t['inactive']} zeroed were off for the target)"
                            if t["inactive"] else ""))
    return "\n".join(lines)


def plot_summary(summary: dict, path: str | Path, *, max_channels: int | None = None) -> None:
    """Three panels (four on a tied run): histogram of channels needed (unflipped counted at
    the cap); where the zeroed channels sit, as each site's share of them over its share of all
    channels when the widths are known (1: in proportion to width); mean accuracies of the
    edited models (dashed: unedited). Noisy and clean targets differ by hatch as well as colour,
    and the legend sits below the panels (or in the empty fourth), off the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from memkern.report.figures.style import EXAMPLE_GROUPS, WIDTH_IN, save_png

    groups = {g: summary["groups"][g] for g in GROUPS if g in summary["groups"]}
    tied = bool(summary.get("tied"))
    # Two by two, one report column wide (memkern.report.figures.style).
    fig, grid = plt.subplots(2, 2, figsize=(WIDTH_IN, 7.4), layout="constrained")
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
        axes[0].hist(e["n_channels"], bins=bins, alpha=0.55, color=colour, hatch=hatch,
                     edgecolor="black", linewidth=0.6,
                     label=f"{g} targets ({flipped_text(e)} fitted flipped)")
    axes[0].set(xlabel="channels zeroed to flip\n(unflipped: at the cap)",
                ylabel="targets (count)", title="channels needed to flip")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))  # a few targets: no 2.5 targets
    sites = summary["sites"]
    normalized = bool(summary.get("site_widths"))
    key = "site_enrichment" if normalized else "site_fraction"
    for k, (g, e) in enumerate(groups.items()):
        bars(axes[1], k, g, range(len(sites)), [e[key][s] for s in sites])
    if normalized:
        axes[1].axhline(1.0, color="black", linestyle="dotted", linewidth=1.5,
                        label="1: zeroed in proportion to the site's width")
    axes[1].set_xticks(range(len(sites)), sites, rotation=45, ha="right", fontsize=8)
    axes[1].set(xlabel="site", ylabel="share of zeroed / share of all channels"
                if normalized else "share of zeroed channels (fraction)",
                title="where they sit" + (" (per width)" if normalized else ""))
    for k, (g, e) in enumerate(groups.items()):
        bars(axes[2], k, g, range(3), [e[f"edited_{a}"] or 0.0 for a in ACCS])
    base = summary.get("base")
    if base:
        for i, a in enumerate(ACCS):
            axes[2].hlines(base[a], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                           label="unedited model" if i == 0 and not normalized else None)
    axes[2].set_xticks(range(3), ["clean\ntrain", "noisy\ntrain", "test"])
    axes[2].set(xlabel="set", ylabel="accuracy of the edited model",
                ylim=(0, 1.05), title="accuracy after the edit (mean)")
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
        fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8)
    else:  # the empty fourth panel holds the legend
        axes[3].axis("off")
        axes[3].legend(handles, labels, loc="center", fontsize=9)
    save_png(fig, path)


def _plot_tied_shares(ax, groups: dict, bars) -> None:
    """Per group: how much more often than chance (among the channels active for each target)
    the zeroed channels at tied sites are the target's own memorization channels, with the
    bootstrap interval over targets."""
    names = list(groups)
    for k, g in enumerate(names):
        t = groups[g]["tied"]
        if t.get("enrichment") is None:
            continue
        bars(ax, 0, g, [k + 0.2], [t["enrichment"]])
        if t.get("enrichment_ci"):
            lo, hi = t["enrichment_ci"]
            ax.errorbar([k], [t["enrichment"]], yerr=[[t["enrichment"] - lo], [hi - t["enrichment"]]],
                        color="black", capsize=6, linewidth=1.5,
                        label=f"{CONFIDENCE:.0%} interval (bootstrap over targets)"
                        if k == 0 else None)
    ax.axhline(1.0, color="black", linestyle="dotted", linewidth=1.5,
               label="1: own channels as often as among the active ones")
    ax.set_xticks(range(len(names)), [f"{g} targets" for g in names])
    ax.set(xlabel="targets", ylabel="own share / active-channel share",
           title="tied dropout: own channels")


SUMMARY_KEYS = ("examples", "sites", "groups")  # what marks a summary as memkern's
LEGACY_SUMMARY = "localize_summary.json"  # the run's summary before it was named after its output


def output_stem(out: str | Path) -> str:
    """What the files of localize output ``out`` are named after: ``X`` of ``X.jsonl``."""
    name = Path(out).name
    return name[:-len(".jsonl")] if name.endswith(".jsonl") and name != ".jsonl" else name


def summary_paths(out: str | Path) -> tuple[Path, Path]:
    """The summary and the figure of localize output ``out``, named after it: ``X.jsonl`` ->
    ``X.summary.json``, ``X.png`` (never a fixed name, so outputs in one folder keep theirs)."""
    out, stem = Path(out), output_stem(out)
    return out.with_name(f"{stem}.summary.json"), out.with_name(f"{stem}.png")


def require_summary_outputs(out: str | Path) -> None:
    """The summary and figure of ``out`` are absent or memkern's (memkern.rundir.ownership)."""
    from memkern.rundir.ownership import require_figure_outputs, require_json_output

    summary, figure = summary_paths(out)
    require_json_output(summary, keys=SUMMARY_KEYS, what="a localization summary")
    require_figure_outputs(figure)


def write_summary(rows: list[dict], out: str | Path, *, site_order: Sequence[str] | None = None,
                  base: dict[str, float] | None = None, site_widths: dict[str, int] | None = None,
                  max_channels: int | None = None, tied: dict[str, dict] | None = None,
                  settings: dict | None = None, selection: str | None = None) -> dict:
    """The summary (JSON) and figure (PNG) of localize output ``out``, at
    :func:`summary_paths`; returns the summary."""
    summary = summarize(rows, site_order=site_order, base=base, site_widths=site_widths,
                        tied=tied, settings=settings, selection=selection)
    summary_path, figure = summary_paths(out)
    atomic_write_json(summary_path, summary)
    plot_summary(summary, figure, max_channels=max_channels)
    return summary
