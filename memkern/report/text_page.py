"""The report's sections for a text run (docs/text.md): what training planted and extracted,
where the canaries sit (localization and what the edit cost), and the tied-dropout gap."""
from __future__ import annotations

from memkern.errors import printable
from memkern.report.figures.text import text_training_png
from memkern.report.findings import num
from memkern.report.page import Cell, Section, Table, figure, grads_cell as page_grads_cell
from memkern.report.run_tables import RunTables
from memkern.report.text_summaries import reps_groups

CAPTIONS = {
    "training": "Per epoch, by how many copies of a canary were planted: the fraction whose "
                "secret greedy decoding from the prefix reproduces exactly, their mean exposure "
                "(log2 of the 10^8 possible secrets minus log2 of the secret's rank) and held-out "
                "bits per byte.",
    "grads": "Per layer group, the norm of the summed gradient of the planted windows and of "
             "the clean windows (mean next-byte loss), their cosine, and the windows' own "
             "gradient norms, at each accounted checkpoint.",
    "rewind": "Each layer group's weights set back to an earlier epoch's, the rest final: "
              "where rewinding removes the canaries and what it costs on held-out text.",
    "retrain": "Each layer group reset to its first weights and retrained on windows with no "
               "planted copy, the rest frozen: a canary extracted again was kept by the "
               "frozen groups.",
    "localize": "Greedy zeroing of MLP neurons until greedy decoding no longer gives the "
                "target's secret (docs/text.md); the cost is measured on the edited model: the "
                "other canaries' extraction and held-out perplexity.",
    "scores": "Per training window, signals from every epoch's predictions (docs/scores.md, "
              "\"Text runs\"); a planted window the model has by heart is predicted better than "
              "ordinary text.",
    "lm_benchmark": "Every published localization method ranks the MLP neurons for each "
                    "memorized target; DEL drops each method's top neurons and measures what is "
                    "forgotten and what it costs, INJ plants fresh canaries into known neurons "
                    "and measures each method's recall of them (docs/text.md).",
    "tied": "A tied-dropout run evaluated with every memorization neuron kept (scaled as in "
            "training) and dropped: memorization that lives in the memorization neurons "
            "disappears when they are dropped.",
}


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _count(value) -> str:
    return "-" if value is None else f"{value:g}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _change(fraction, unit: str = "") -> str:
    """A change given as a fraction, in points or percent (``unit``): one decimal, signed; one
    that rounds to zero reads +0.0, never -0.0."""
    return "-" if fraction is None else f"{round(100 * fraction, 1) + 0.0:+.1f}{unit}"


def training_cell(t: RunTables) -> Cell:
    last = t.last
    groups = reps_groups(last)
    rows = [[f"{r} copies", num(last.get(f"extracted_r{r}")), num(last.get(f"exposure_r{r}"))]
            for r in groups]
    if groups:
        top, low = groups[-1], groups[0]
        finding = (f"After epoch {last['epoch']}, {_pct(last.get(f'extracted_r{top}'))} of the "
                   f"canaries planted {_times(top)} are extracted exactly, "
                   f"{_pct(last.get(f'extracted_r{low}'))} of those planted {_times(low)}; "
                   f"held-out text costs {num(last.get('heldout_bpb'))} bits per byte.")
    else:
        finding = (f"No canary was planted; held-out text costs {num(last.get('heldout_bpb'))} "
                   f"bits per byte after epoch {last['epoch']}.")
    tables = [Table(f"canaries at epoch {last['epoch']}", ["canaries", "extracted", "exposure"],
                    rows)] if rows else []
    if "suffix_acc" in last:
        tables.append(Table("duplicated paragraphs", ["measure", "value"],
                            [["suffix accuracy (teacher-forced)", num(last["suffix_acc"])]]))
    return Cell(t.name, finding,
                [figure("extraction, exposure and held-out bits per byte per epoch",
                        text_training_png(t.metrics, title=f"training: {t.name}"))], tables)


def localize_cell(t: RunTables) -> Cell:
    s = t.localize
    if not s:
        return Cell(t.name, missing=f"no localization: memkern localize --run "
                                    f"{printable(str(t.run.root))} --examples canaries")
    groups = s["groups"]
    overall = groups.get("all") or next(iter(groups.values()))
    stopped, extracted = sum(overall["flipped"]), overall["extracted"]
    if extracted:
        finding = (f"Zeroing MLP neurons stopped the extraction of {stopped} of the {extracted} "
                   f"extracted targets (median {_count(overall['median_channels_flipped'])} "
                   f"neurons, {_pct(overall['share_flipped'])} of those localized)"
                   + ("" if overall["exposure_before"] is None else
                      f"; their mean exposure went from {num(overall['exposure_before'])} to "
                      f"{num(overall['exposure_after'])} bits (a secret can stop being the "
                      f"greedy answer and stay among the most likely strings)")
                   + "; the other canaries' extraction changed by "
                   f"{_change(overall['others_change'], ' points')} and held-out perplexity by "
                   f"{_change(overall['perplexity_rise'], '%')} on average (at most "
                   f"{_change(overall['perplexity_rise_max'], '%')}).")
    else:
        finding = "No localized target was extracted before the edit: nothing to localize."
    rows = [[g, str(e["count"]), str(e["extracted"]), f"{sum(e['flipped'])} of {e['extracted']}",
             _count(e["median_channels_flipped"]), _pct(e["share_flipped"]),
             "-" if e["exposure_before"] is None
             else f"{num(e['exposure_before'])} -> {num(e['exposure_after'])}",
             _change(e["others_change"]), _change(e["perplexity_rise"], "%")]
            for g, e in groups.items()]
    figures = [figure("neurons needed and the edit's cost", t.figures["localize"].read_bytes())] \
        if "localize" in t.figures else []
    return Cell(t.name, finding, figures, [Table(
        "targets stopped, neurons needed and what the edit cost",
        ["targets", "count", "extracted", "stopped", "median neurons", "share", "exposure",
         "others (points)", "perplexity rise"], rows)])


def tied_cell(t: RunTables) -> Cell:
    last = t.last
    if "heldout_bpb_drop" not in last:
        return Cell(t.name, missing="trained without tied dropout: memkern train "
                                    "--tied-dropout ... on the same data")
    groups = reps_groups(last)
    rows = [[f"{r} copies", *[num(last.get(f"extracted_r{r}{m}")) for m in ("", "_keep",
                                                                             "_drop")]]
            for r in groups]
    rows.append(["held-out bits/byte", *[num(last.get(f"heldout_bpb{m}"))
                                         for m in ("", "_keep", "_drop")]])
    top = groups[-1] if groups else None
    finding = None if top is None else (
        f"With the memorization neurons dropped, {_pct(last.get(f'extracted_r{top}_drop'))} "
        f"of the {top}-copy canaries are extracted, against "
        f"{_pct(last.get(f'extracted_r{top}'))} under each copy's own mask (as trained) and "
        f"{_pct(last.get(f'extracted_r{top}_keep'))} with every memorization neuron kept "
        f"(scaled by p_mem); held-out text costs {num(last.get('heldout_bpb_drop'))} bits per "
        f"byte with them dropped.")
    return Cell(t.name, finding, tables=[Table(
        "canaries extracted with the run's own masks, memorization neurons kept and dropped",
        ["", "own masks", "kept", "dropped"], rows)])


def scores_cell(t: RunTables) -> Cell:
    if not t.benchmark:
        return Cell(t.name, missing=("scores.csv holds the per-window signals; how well they "
                                     "find the planted windows: " if t.scores else
                                     "no scores: ")
                    + f"memkern scores --run {printable(str(t.run.root))} --benchmark")
    groups = [k for k in t.benchmark[0] if k.startswith("auroc_r")]
    best = t.benchmark[0]
    finding = (f"{best['signal']} finds the planted windows best: AUROC {num(best['auroc'])} "
               f"over {int(best['covered'])} windows"
               + "".join(f"; {g[7:]}-copy canaries {num(best[g])}" for g in groups) + ".")
    return Cell(t.name, finding, tables=[Table(
        "how well each signal finds the planted windows (AUROC: 0.5 is chance), best first",
        ["signal", "windows", "AUROC", "AP", *[f"AUROC {g[7:]} copies" for g in groups]],
        [[r["signal"], str(int(r["covered"])), num(r["auroc"]), num(r["ap"]),
          *[num(r[g]) for g in groups]] for r in t.benchmark])])


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if value != value else value


def lm_benchmark_cell(t: RunTables) -> Cell:
    rows = t.lm_benchmark
    if not rows:
        return Cell(t.name, missing=f"no method comparison: memkern benchmark-lm --run "
                                    f"{printable(str(t.run.root))}")
    dropped = [r for r in rows if r.get("benchmark") == "DEL"]
    injected = [r for r in rows if r.get("benchmark") == "INJ"]
    best = max(dropped, key=lambda r: (_float(r["efficacy"]) or 0.0), default=None)
    if best is None:
        finding = None
    elif not _float(best["efficacy"]):
        finding = (f"No method forgot any of the {best['targets']} targets by dropping up to "
                   f"{max(_float(r['fraction_pct']) or 0.0 for r in dropped):g}% of each MLP "
                   f"layer's neurons.")
    else:
        finding = (f"Dropping {best['method']}'s top {best['fraction_pct']}% of each MLP layer "
                   f"forgot {_pct(_float(best['efficacy']))} of {best['targets']} targets, the "
                   f"most of any method and fraction, at a held-out perplexity change of "
                   f"{num(_float(best['ppl_change_pct']))}% and a change of "
                   f"{num(_float(best['others_change_pts']))} points in the other canaries' "
                   f"extraction.")
    tables = []
    if dropped:
        tables.append(Table(
            "DEL: drop each method's top neurons of every MLP layer for one target",
            ["method", "drop %", "targets", "forgotten", "other canaries (points)",
             "perplexity change %", "exposure change (bits)", "s / target"],
            [[r["method"], r["fraction_pct"], r["targets"], _pct(_float(r["efficacy"])),
              num(_float(r["others_change_pts"])), num(_float(r["ppl_change_pct"])),
              num(_float(r["exposure_change"])), num(_float(r["rank_s"]))] for r in dropped],
            collapsed=len(dropped) > 12))
    if injected:
        tables.append(Table(
            "INJ: recall of the neurons fresh canaries were planted in",
            ["method", "planted %", "injections", "recall", "chance", "extracted"],
            [[r["method"], r["fraction_pct"], r["targets"], num(_float(r["recall"])),
              num(_float(r["chance"])), r["reached"]] for r in injected],
            collapsed=len(injected) > 12))
    figures = [figure("forgotten against damage per method", t.figures["lm_benchmark"]
                      .read_bytes())] if "lm_benchmark" in t.figures else []
    return Cell(t.name, finding, figures, tables)


def _layers_table(rows: list[dict], title: str) -> Table:
    groups = reps_groups(rows[0])
    return Table(title, ["group", "epoch", "held-out bits/byte",
                         *[f"extracted ({r} copies)" for r in groups]],
                 [[r["group"], str(r["epoch"]), num(r["heldout_bpb"]),
                   *[num(r.get(f"extracted_r{g}")) for g in groups]] for r in rows],
                 collapsed=len(rows) > 12)


def grads_cell(t: RunTables) -> Cell:
    return page_grads_cell(t, memorized="planted", kind="window")


def rewind_cell(t: RunTables) -> Cell:
    if not t.rewind:
        return Cell(t.name, missing=f"no rewinding: memkern rewind --run "
                                    f"{printable(str(t.run.root))}")
    groups = reps_groups(t.rewind[0])
    top = groups[-1] if groups else None
    finding = None
    if top is not None:
        final = t.rewind[0]
        # the rewind that removes the most, and among those the one costing least
        worst = min(t.rewind[1:], key=lambda r: (r.get(f"extracted_r{top}", 1.0),
                                                 r["heldout_bpb"]), default=None)
        if worst is not None:
            finding = (f"Rewinding {worst['group']} to epoch {worst['epoch']} leaves "
                       f"{_pct(worst.get(f'extracted_r{top}'))} of the {top}-copy canaries "
                       f"extracted (final model: {_pct(final.get(f'extracted_r{top}'))}) at "
                       f"{num(worst['heldout_bpb'])} held-out bits per byte (final: "
                       f"{num(final['heldout_bpb'])}).")
    figures = [figure("extraction against held-out bits per byte per rewound group",
                      t.figures["rewind"].read_bytes())] if "rewind" in t.figures else []
    return Cell(t.name, finding, figures,
                [_layers_table(t.rewind, "each group rewound to an earlier epoch")])


def retrain_cell(t: RunTables) -> Cell:
    if not t.retrain:
        return Cell(t.name, missing=f"no retraining: memkern retrain --run "
                                    f"{printable(str(t.run.root))}")
    figures = [figure("extraction and held-out bits per byte while retraining",
                      t.figures["retrain"].read_bytes())] if "retrain" in t.figures else []
    return Cell(t.name, None, figures,
                [_layers_table(t.retrain, "each group reset and retrained on clean windows")])


def text_headline(runs: list[RunTables]) -> list[tuple[str, list[str]]]:
    def top(t):
        groups = reps_groups(t.last)
        return "-" if not groups else \
            f"{num(t.last.get(f'extracted_r{groups[-1]}'))} ({groups[-1]} copies)"

    def stopped(t):
        if not t.localize:
            return "-"
        g = t.localize["groups"]
        e = g.get("all") or next(iter(g.values()))
        return (f"{sum(e['flipped'])} of {e['extracted']}, median "
                f"{_count(e['median_channels_flipped'])} neurons, perplexity "
                f"{_change(e['perplexity_rise'], '%')}")

    def dropped(t):
        groups = reps_groups(t.last)
        if not groups or f"extracted_r{groups[-1]}_drop" not in t.last:
            return "-"
        return num(t.last[f"extracted_r{groups[-1]}_drop"])

    lines = [("held-out bits per byte", [num(t.last.get("heldout_bpb")) for t in runs]),
             ("canaries extracted, most-copied group", [top(t) for t in runs])]
    if any("heldout_bpb_drop" in t.last for t in runs):
        lines.append(("... with the memorization neurons dropped (tied dropout)",
                      [dropped(t) for t in runs]))
    return lines + [
        ("extracted targets stopped by zeroing neurons", [stopped(t) for t in runs])]


def text_warnings(runs: list[RunTables]) -> list[str]:
    out = []
    for t in runs:
        groups = reps_groups(t.last)
        if groups and not any(t.last.get(f"extracted_r{r}") for r in groups):
            out.append(f"{t.name}: no canary is extracted after the last epoch, so there is "
                       f"nothing memorized to localize; train longer or plant more copies")
    return out


def describe_text(t: RunTables) -> str:
    c = t.config
    return (f"{c.model} on {c.dataset}: {c.canaries} canaries planted "
            f"{', '.join(map(str, c.canary_reps))} times"
            + (f", {c.dup_paragraphs} paragraphs x{c.dup_reps}" if c.dup_paragraphs else "")
            + f", windows of {c.seq_len} bytes, {t.last['epoch']} epochs"
            + (f", example-tied dropout p_gen={c.p_gen} p_mem={c.p_mem}" if c.tied_dropout
               else "") + ".")


TEXT_SECTIONS = (("training", "Training: what was planted and extracted", training_cell),
                 ("grads", "Gradient accounting: planted against clean windows", grads_cell),
                 ("rewind", "Layer rewinding", rewind_cell),
                 ("retrain", "Retraining one group on clean windows", retrain_cell),
                 ("localize", "Localization: neurons that hold a secret", localize_cell),
                 ("tied", "Example-tied dropout", tied_cell),
                 ("scores", "Which windows were memorized?", scores_cell),
                 ("lm_benchmark", "Localization methods side by side (DEL, INJ)",
                  lm_benchmark_cell))


def text_findings(t: RunTables) -> list[str]:
    """The page's caveat and each section's finding for one text run, in page order."""
    return text_warnings([t]) + [c.finding for _, _, cell in TEXT_SECTIONS
                                 if (c := cell(t)).finding]


def text_sections(runs: list[RunTables]) -> list[Section]:
    return [Section(key, title, CAPTIONS[key], [cell(t) for t in runs])
            for key, title, cell in TEXT_SECTIONS]
