"""The benchmark's table: the runner's lines aggregated per method and fraction, beside the
published numbers of the papers the benchmark follows (docs/text.md, "Localization benchmark").

DEL (per method and fraction of each MLP site dropped): ``efficacy``, the share of the extracted
canaries no longer extracted after their edit (memorization change = -100 x efficacy, TinyMem's
measure); ``others_change_pts``, the change in points of the extraction of the other canaries
the model extracted;
``ppl_change_pct``, of held-out per-byte perplexity (2^bits-per-byte); ``exposure_change`` (bits)
of the extracted canaries; ``suffix_acc_change_pts`` for duplicated paragraphs (all after minus
before). INJ: ``recall`` of the planted neurons within
the method's top neurons of the same count, ``chance`` (what a random ranking finds:
planted/width), ``reached`` (injections whose canary was extracted). ``rank_s``: the method's wall
time per target.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

COLUMNS = ("benchmark", "method", "fraction_pct", "targets", "efficacy",
           "memorization_change_pct", "others_change_pts", "ppl_change_pct", "exposure_change",
           "suffix_acc_change_pts", "recall", "chance", "reached", "rank_s")
TITLE = "# memkern language-model localization benchmark"

# TinyMem (Sakarvadia et al., ICLR 2025), best runs on its 4-layer model: memorization change
# (% of memorized sequences, where the paper states it) and perplexity change (%).
TINYMEM = {"zero_out": ("Zero-Out", -100.0, 0.8), "balanced_subnet": ("BalancedSubnet", None, 1.4),
           "slimming": ("Slimming", None, 2.1), "activations": ("Activations", None, 4.2),
           "hard_concrete": ("HardConcrete", None, 29.7), "greedy": ("greedy", -92.5, 11.5)}
MEMPI = ("MemPi (Chang et al., NAACL 2024): HardConcrete and Slimming best on INJ; every method "
         "above random; the neurons found are not specific to one sequence.")


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _del_rows(lines: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[tuple[dict, dict]]] = defaultdict(list)
    for line in lines:
        for r in line["drops"]:
            groups[line["method"], r["fraction"]].append((line, r))
    out = []
    for (method, fraction), pairs in groups.items():
        canaries = [r for line, r in pairs if line["target_kind"] == "canary"]
        held = [r for r in canaries if r["extracted_before"]]
        paragraphs = [r for line, r in pairs if line["target_kind"] == "paragraph"]
        efficacy = _mean([float(not r["extracted_after"]) for r in held])
        out.append({
            "benchmark": "DEL", "method": method, "fraction_pct": 100 * fraction,
            "targets": len(pairs), "efficacy": efficacy, "memorization_change_pct": -100 * efficacy,
            "others_change_pts": _mean([100 * (r["others_after"] - r["others_before"])
                                        for _, r in pairs if r["others_after"] is not None
                                        and r["others_before"] is not None]),
            "ppl_change_pct": _mean([100 * (2 ** (r["bpb_after"] - r["bpb_before"]) - 1)
                                     for _, r in pairs]),
            "exposure_change": _mean([r["exposure_after"] - r["exposure_before"] for r in held]),
            "suffix_acc_change_pts": _mean([100 * (r["acc_after"] - r["acc_before"])
                                            for r in paragraphs]),
            "rank_s": _mean([line["rank_s"] for line, _ in pairs])})
    return out


def _inj_rows(lines: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for line in lines:
        groups[line["method"], line["fraction"]].append(line)
    return [{"benchmark": "INJ", "method": method, "fraction_pct": 100 * fraction,
             "targets": len(rows), "recall": _mean([r["recall"] for r in rows]),
             "chance": _mean([r["chance"] for r in rows]),
             "reached": f"{sum(r['extracted'] for r in rows)}/{len(rows)}",
             "rank_s": _mean([r["rank_s"] for r in rows])}
            for (method, fraction), rows in groups.items()]


def benchmark_table(lines: list[dict], methods: list[str]) -> list[dict]:
    """One row per (benchmark, method, fraction) of the runner's ``lines``, methods in the order
    of ``methods`` (others after them, by name), fractions ascending."""
    rows = _del_rows([x for x in lines if x["kind"] == "del"]) + \
        _inj_rows([x for x in lines if x["kind"] == "inj"])
    place = {m: i for i, m in enumerate(methods)}
    return sorted(rows, key=lambda r: (r["benchmark"], place.get(r["method"], len(place)),
                                       r["method"], r["fraction_pct"]))


def _cell(value, digits: int = 1, sign: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:{sign}.{digits}f}" if isinstance(value, float) else str(value)


def _anchor(method: str) -> str:
    if method not in TINYMEM:
        return ""
    name, memorization, ppl = TINYMEM[method]
    said = f"{memorization:+.1f}% at " if memorization is not None else ""
    return f"{name}: {said}{ppl:+.1f}% ppl"


def markdown(rows: list[dict], *, run: str) -> str:
    """The table as markdown: DEL and INJ apart, each DEL method beside TinyMem's number for it,
    MemPi's finding under INJ."""
    out = [f"{TITLE}: {run}", "",
           "## DEL: drop each method's top neurons of every MLP site for one target", "",
           "| method | drop % | targets | forgotten | memorization "
           "| other extracted canaries (pts) "
           "| perplexity | exposure (bits) | paragraph suffix acc (pts) | s / target "
           "| TinyMem 4-layer (published) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in rows if r["benchmark"] == "DEL"):
        out.append(f"| {r['method']} | {r['fraction_pct']:g} | {r['targets']} "
                   f"| {_cell(r['efficacy'], 2)} | {_cell(r['memorization_change_pct'], 1, '+')}% "
                   f"| {_cell(r['others_change_pts'], 1, '+')} "
                   f"| {_cell(r['ppl_change_pct'], 2, '+')}% "
                   f"| {_cell(r['exposure_change'], 1, '+')} "
                   f"| {_cell(r['suffix_acc_change_pts'], 1, '+')} "
                   f"| {_cell(r['rank_s'], 2)} | {_anchor(r['method'])} |")
    inj = [r for r in rows if r["benchmark"] == "INJ"]
    if inj:
        out += ["", "## INJ: recall of the neurons a fresh canary was planted in", "",
                "| method | planted % | injections | recall | chance | extracted | s / target |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['method']} | {r['fraction_pct']:g} | {r['targets']} "
                f"| {_cell(r['recall'], 3)} | {_cell(r['chance'], 3)} | {r['reached']} "
                f"| {_cell(r['rank_s'], 2)} |" for r in inj]
    out += ["", "Published anchors (their models and data, not computed here): TinyMem "
            "(Sakarvadia et al., ICLR 2025), best 4-layer runs: memorization change at perplexity "
            "change; " + MEMPI, ""]
    return "\n".join(out)
