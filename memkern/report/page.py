"""``memkern report``: one self-contained HTML page over a run (or a plain and a tied run side by
side) that states the findings in words, in the order of docs/method.md: training, gradient
accounting, rewinding, retraining, localization, example-tied dropout, memorization scores.

Figures are embedded as base64 PNG, so ``index.html`` can be mailed or moved alone and opens
without a network. Sentences come from :mod:`memkern.report.findings`; tables from the run's own files
(:mod:`memkern.report.run_tables`). An analysis a run lacks is listed with the command that adds it.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from memkern.report import findings
from memkern.rundir.atomic import atomic_write_text
from memkern.errors import ConfigError, printable
from memkern.report.findings import num
from memkern.report.summaries import benchmark_table
from memkern.rundir.locks import hold_run, locked
from memkern.report.run_tables import RunTables, last_accounted, load_run_tables
from memkern.report.figures.training import training_curves_png
from memkern.experiments.localize.summary import enrichment_text, settings_text

TEMPLATE = "report.html.j2"
SPLIT_NAMES = (("clean_acc", "clean train"), ("noisy_acc", "noisy train (flipped labels)"),
               ("test_acc", "test"))


@dataclass
class Table:
    """``rows``: already formatted cells. ``collapsed``: shown folded (a long table)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    collapsed: bool = False


@dataclass
class Figure:
    title: str
    src: str  # a data: URI
    width: int = 0  # drawn size in pixels (the page never shows it larger, unless enlarged)
    height: int = 0

    @property
    def ratio(self) -> float:
        """Height over width, for the enlarged view's size."""
        return round(self.height / self.width, 4) if self.width else 1.0


@dataclass
class Cell:
    """One run's part of a section; ``missing``: why it is empty and the command that fills it."""

    run: str
    finding: str | None = None
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    missing: str | None = None
    note: str | None = None  # how the numbers were computed


@dataclass
class Section:
    key: str
    title: str
    caption: str
    cells: list[Cell]
    joint: Cell | None = None  # spans both runs of a comparison


CAPTIONS = {
    "training": "Accuracy after every epoch on the clean training examples, on the training "
                "examples whose labels were flipped (measured against the flipped label: the "
                "model fits those only by memorizing them) and on the test set.",
    "grads": "Per layer group and checkpoint: the norm of the summed gradient of the clean "
             "examples and of the noisy ones (both over the whole training set, so they add up "
             "to the full-batch gradient), and the cosine between the two sums. The paper "
             "finds the few noisy examples contributing norms comparable to the many clean "
             "ones, in every layer.",
    "rewind": "Each layer group of the final model, weights and BatchNorm statistics, put back "
              "to an earlier checkpoint while the rest stays final. A group whose rewinding "
              "undoes the fit of the flipped labels holds part of the memorization.",
    "retrain": "Each layer group reset to an early checkpoint, every other group frozen, and the "
               "group trained again on the clean examples only. Where noisy accuracy comes back, "
               "the memorized labels are kept outside that group.",
    "localize": "For each target example, channels are zeroed one at a time (the one that most "
                "raises the target's loss while keeping a reference batch right) until the "
                "prediction leaves the target's label. Few channels needed means a localized "
                "memory; the per-site shares say where those channels sit.",
    "tied": "Example-tied dropout gives every training example a fixed set of memorization "
            "channels besides the always-on generalization channels. Evaluated with the "
            "memorization channels dropped, the model should lose the flipped labels it "
            "memorized while clean-train and test accuracy hold.",
    "scores": "Every per-example memorization signal the run holds, ranked against the flipped "
              "labels (which examples did the model memorize?).",
}


def data_uri(png: bytes) -> str:
    """A PNG as an ``<img src>`` that needs no file beside the page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels as a PNG's header records them; (0, 0) for anything else."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        return 0, 0
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def figure(title: str, png: bytes) -> Figure:
    return Figure(title, data_uri(png), *png_size(png))


def _figures(t: RunTables, *names: tuple[str, str]) -> list[Figure]:
    return [figure(title, t.figures[key].read_bytes()) for key, title in names
            if key in t.figures]


def _g(value) -> str:
    """A table number: four significant digits."""
    v = float(value)
    return "n/a" if math.isnan(v) else f"{v:.4g}"


def imported_cell(t: RunTables) -> Cell:
    """An imported run's training section: no history, the labels it was trained with, and
    its accuracies once `memkern evaluate` has measured them."""
    labels = (f"{len(t.noise['noisy_indices'])} of {t.noise['num_train']} training labels differ "
              f"from the dataset's" if t.config.train_labels
              else "the labels it was trained with are unknown")
    finding = f"Weights imported (trained outside memkern), so no training history; {labels}."
    if not t.metrics:
        return Cell(t.name, finding,
                    missing=f"accuracies: memkern evaluate --run {printable(str(t.run.root))}")
    rows = [[label, num(t.last.get(key))] for key, label in SPLIT_NAMES]
    return Cell(t.name, finding, tables=[Table("accuracy of the imported weights",
                                               ["set", "imported"], rows)])


def training_cell(t: RunTables) -> Cell:
    if t.config.imported:
        return imported_cell(t)
    last = t.last
    modes = [("", "final epoch")] + ([("_keep", "kept"), ("_drop", "dropped")] if t.tied else [])
    columns = ["set"] + [name for _, name in modes]
    rows = [[label] + [num(last.get(f"{key}{m}")) for m, _ in modes] for key, label in SPLIT_NAMES]
    return Cell(t.name, findings.training_finding(last, epochs=last["epoch"],
                                                  noisy=len(t.noise["noisy_indices"]),
                                                  train=t.noise["num_train"]),
                [figure("accuracy per epoch",
                        training_curves_png(t.metrics, title=f"training: {t.name}"))],
                [Table(f"accuracy at epoch {last['epoch']}"
                       + (" (memorization channels kept / dropped)" if t.tied else ""),
                       columns, rows)])


def grads_cell(t: RunTables, *, memorized: str = "noisy", kind: str = "example") -> Cell:
    """``memorized`` / ``kind``: the split's words (a text run: "planted" "window")."""
    if not t.grads:
        return Cell(t.name, missing=f"no gradient accounting: memkern grads --run "
                                    f"{printable(str(t.run.root))}")
    last = last_accounted(t.grads)
    key = Table(f"epoch {last[0]['epoch']}: summed gradients of clean and {memorized} {kind}s",
                ["group", "clean norm", f"{memorized} norm", f"{memorized} / clean", "cosine",
                 f"per-{kind} {memorized} / clean"],
                [[r["group"], _g(r["clean_norm"]), _g(r["noisy_norm"]),
                  num(float(r["noisy_norm"]) / float(r["clean_norm"])
                      if float(r["clean_norm"]) > 0 else None),
                  num(float(r["cosine"])),
                  num(float(r["noisy_mean"]) / float(r["clean_mean"])
                      if r.get("clean_mean") and float(r["clean_mean"]) > 0 else None)]
                 for r in last])
    return Cell(t.name, findings.accounting_finding(t.grads, memorized=memorized, kind=kind),
                _figures(t, ("summed_norms", "norm of the summed gradient per group"),
                         ("cosine", f"cosine between the clean and {memorized} sums"),
                         ("live_summed_norms", "during training: summed gradient norms"),
                         ("live_cosine", "during training: cosine")),
                [key, *_grads_tables(t.grads)])


def _grads_tables(rows: list[dict]) -> list[Table]:
    """grads/summary.csv, folded, in parts narrow enough for one column of the page: the sums
    and their cosine, then the per-example norms of the clean and of the noisy examples."""
    columns = [c for c in rows[0] if c not in ("epoch", "group")]
    per_example = {kind: [c for c in columns if c.startswith(f"{kind}_") and c != f"{kind}_norm"]
                   for kind in ("clean", "noisy")}
    sums = [c for c in columns if c not in per_example["clean"] + per_example["noisy"]]
    parts = [("summed gradients", sums, ""),
             ("per-example gradient norms of the clean examples", per_example["clean"],
              "clean_"),
             ("per-example gradient norms of the noisy examples", per_example["noisy"],
              "noisy_")]
    return [Table(f"grads/summary.csv ({len(rows)} rows): {what}",
                  ["epoch", "group"] + [c.removeprefix(prefix).replace("_", " ") for c in part],
                  [[r["epoch"], r["group"]] + [_g(r[c]) for c in part] for r in rows],
                  collapsed=True)
            for what, part, prefix in parts if part]


def _pivot(rows: list[dict], key: str, title: str) -> Table:
    epochs = sorted({r["epoch"] for r in rows})
    groups = list(dict.fromkeys(r["group"] for r in rows))
    cell = {(r["group"], r["epoch"]): r[key] for r in rows}
    return Table(title, ["group \\ epoch"] + [str(e) for e in epochs],
                 [[g] + [num(cell.get((g, e))) for e in epochs] for g in groups])


def rewind_cell(t: RunTables) -> Cell:
    if not t.rewind:
        return Cell(t.name, missing=f"no layer rewinding: memkern rewind --run "
                                    f"{printable(str(t.run.root))}")
    configs = [r for r in t.rewind if r["group"] != findings.BASELINE]
    return Cell(t.name, findings.caveated(findings.rewind_finding(t.rewind), t.last),
                _figures(t, ("rewind", "accuracy after rewinding one group")),
                [_pivot(configs, "noisy_acc", "noisy-train accuracy after rewinding"),
                 _pivot(configs, "test_acc", "test accuracy after rewinding")])


def retrain_cell(t: RunTables) -> Cell:
    if not t.retrain:
        return Cell(t.name, missing=f"no retraining: memkern retrain --run "
                                    f"{printable(str(t.run.root))}")
    rows = []
    for g in dict.fromkeys(r["group"] for r in t.retrain):
        mine = sorted((r for r in t.retrain if r["group"] == g), key=lambda r: r["epoch"])
        rows.append([g] + [num(mine[0][k]) for k, _ in SPLIT_NAMES]
                    + [num(mine[-1][k]) for k, _ in SPLIT_NAMES])
    return Cell(t.name, findings.caveated(findings.retrain_finding(t.retrain), t.last),
                _figures(t, ("retrain", "accuracy while retraining one group on clean data")),
                [Table("at the reset and after retraining",
                       ["group", "reset: clean", "noisy", "test", "retrained: clean", "noisy",
                        "test"], rows)])


def _localize_tables(summary: dict) -> list[Table]:
    groups, base = summary["groups"], summary.get("base") or {}
    rows = [[g, str(e["count"]), str(e.get("unfitted", 0)),
             f"{findings.flipped_count(e)} of {e['count'] - e.get('unfitted', 0)}",
             "-" if e["median_channels_flipped"] is None else f"{e['median_channels_flipped']:g}",
             "-" if e["mean_channels_flipped"] is None else f"{e['mean_channels_flipped']:.1f}",
             num(e["edited_clean_acc"]), num(e["edited_noisy_acc"]), num(e["edited_test_acc"])]
            for g, e in groups.items()]
    if base:
        rows.append(["unedited model", "", "", "", "", "", num(base["clean_acc"]),
                     num(base["noisy_acc"]), num(base["test_acc"])])
    tables = [Table("channels needed to flip a target, and the edited model's accuracy",
                    ["targets", "count", "unfitted", "flipped", "median ch.", "mean ch.",
                     "clean acc", "noisy acc", "test acc"], rows)]
    widths = summary.get("site_widths")
    site_rows = [[s] + ([str(widths[s])] if widths else [])
                 + [num(groups[g]["site_fraction"][s]) for g in groups]
                 + ([num(groups[g]["site_enrichment"][s]) for g in groups] if widths else [])
                 for s in summary["sites"]]
    tables.append(Table("where the zeroed channels sit: share of them, and that share over the "
                        "site's share of all channels" if widths else
                        "where the zeroed channels sit: share of them",
                        ["site"] + (["width"] if widths else [])
                        + [f"share {g}" for g in groups]
                        + ([f"vs width {g}" for g in groups] if widths else []),
                        site_rows))
    if summary.get("tied") and all("enrichment" in e.get("tied", {}) for e in groups.values()):
        tables.append(Table(
            "tied-dropout sites: zeroed channels that are the target's own memorization "
            "channels, against their share of the channels active for it",
            ["targets", "zeroed (active)", "own", "own share", "baseline", "enrichment"],
            [[g, f"{e['tied']['zeroed']} ({e['tied']['active']})", str(e["tied"]["own"]),
              num(e["tied"]["own_share"]), num(e["tied"]["active_baseline"]),
              enrichment_text(e["tied"])] for g, e in groups.items()]))
    return tables


def localize_command(t: RunTables) -> str | None:
    """The `memkern localize` line that adds targets to this run's output with the settings its
    lines were computed with (the options that differ from the defaults)."""
    settings = (t.localize or {}).get("settings")
    if not settings:
        return None
    defaults = {"method": "greedy", "max_channels": 50, "eot": 0, "ref_batch": 512, "seed": 0,
                "candidates": None}
    options = "".join(f" --{k.replace('_', '-')} {settings[k]}" for k in defaults
                      if settings.get(k) != defaults[k])
    return f"memkern localize --run {printable(str(t.run.root))}{options}"


def localize_cell(t: RunTables) -> Cell:
    if not t.localize:
        return Cell(t.name, missing=f"no localization: memkern localize --ckpt "
                                    f"{printable(str(t.run.final_checkpoint()))}")
    done = settings_text(t.localize)
    command = localize_command(t)
    note = (f" Computed with {done}; more targets with the same settings: {command}."
            if done else "")
    return Cell(t.name, findings.caveated(findings.localization_finding(t.localize), t.last),
                _figures(t, ("localize", "channels needed, where they sit, cost of the edits")),
                _localize_tables(t.localize), note=note.strip() or None)


def _accuracy_row(label: str, last: dict, mode: str = "") -> list[str]:
    accs = [last[f"{k}{mode}"] for k, _ in SPLIT_NAMES]
    return [label] + [num(a) for a in accs] + [num(accs[0] - accs[2])]


TIED_COLUMNS = ["model", "clean train", "noisy train", "test", "gap (clean - test)"]


def tied_cell(t: RunTables) -> Cell:
    if not t.tied:
        return Cell(t.name, missing="not a tied-dropout run: train one with memkern train "
                                    "--tied-dropout and show it beside this one with --compare")
    last = t.last
    share = findings.tied_share_finding(t.localize) if t.localize else None
    return Cell(t.name, findings.caveated(
                    " ".join(s for s in (findings.tied_drop_finding(last), share) if s), last),
                tables=[Table(f"epoch {last['epoch']}", TIED_COLUMNS,
                              [_accuracy_row("own masks (as trained)", last),
                               _accuracy_row("memorization channels kept", last, "_keep"),
                               _accuracy_row("memorization channels dropped", last, "_drop")])])


def tied_joint(plain: RunTables, tied: RunTables) -> Cell:
    """The paper's tied-dropout headline across the two runs."""
    share = findings.tied_share_finding(tied.localize) if tied.localize else None
    text = findings.comparison_finding(plain.last, tied.last) + (f" {share}" if share else "")
    return Cell(f"{plain.name} and {tied.name}", findings.caveated(text, tied.last), tables=[Table(
        "final epoch of each run", TIED_COLUMNS,
        [_accuracy_row(plain.name, plain.last),
         _accuracy_row(f"{tied.name}, own masks (as trained)", tied.last),
         _accuracy_row(f"{tied.name}, memorization channels kept", tied.last, "_keep"),
         _accuracy_row(f"{tied.name}, memorization channels dropped", tied.last, "_drop")])])


def scores_cell(t: RunTables) -> Cell:
    if not t.scores:
        return Cell(t.name, missing=f"no memorization scores: memkern scores --run "
                                    f"{printable(str(t.run.root))} --compute --benchmark")
    tables = []
    if t.benchmark:
        header, cells = benchmark_table(t.benchmark)
        tables.append(Table("how well each signal finds the flipped labels, best first", header,
                            cells))
    return Cell(t.name, findings.caveated(findings.scores_finding(t.benchmark or []), t.last),
                _figures(t, ("benchmark_curves", "detection curves of every signal"),
                         ("top_memorization_score", "training examples ranked most memorized")),
                tables, None if t.benchmark else "scores.csv present; no benchmark: add "
                "--benchmark to memkern scores")


def headline(runs: list[RunTables]) -> list[tuple[str, list[str]]]:
    """The first screen: a few numbers per run, each beside the test accuracy it costs."""
    if runs[0].config.text:
        from memkern.report.text_page import text_headline
        return text_headline(runs)

    def test(value) -> str:
        return f"test {num(value)}"

    def critical(t):
        if not t.rewind:
            return "-"
        c = findings.rewind_critical(t.rewind)
        if c is None:
            return "none within the rule"
        return (f"{c['group']} to epoch {c['epoch']}: noisy {num(c['noisy_acc'])}, "
                f"{test(c['test_acc'])}")

    def channels(t):
        if not t.localize:
            return "-"
        groups = t.localize["groups"]
        med = [groups[g]["median_channels_flipped"] if g in groups else None
               for g in ("noisy", "clean")]
        text = " / ".join("-" if m is None else f"{m:g}" for m in med)
        edited = groups.get("noisy", {}).get("edited_test_acc")
        return text + (f" (edited noisy targets: {test(edited)})" if edited is not None else "")

    def peak(t):
        p = findings.accounting_ratio_peak(t.grads) if t.grads else None
        return f"{num(p[1])} (epoch {p[0]})" if p else "-"

    lines = [("test accuracy", [num(t.last.get("test_acc")) for t in runs]),
             ("flipped labels fitted (memorized)", [num(t.last.get("noisy_acc")) for t in runs])]
    if any(t.tied for t in runs):
        lines.append(("flipped labels fitted, memorization channels dropped",
                      [f"{num(t.last['noisy_acc_drop'])}, {test(t.last['test_acc_drop'])}"
                       if t.tied else "-" for t in runs]))
    lines += [("median channels to flip a noisy / clean example", [channels(t) for t in runs]),
              (f"rewinding that most undoes the memorization (test accuracy within "
               f"{findings.TEST_HOLDS} of the final model's)",
               [critical(t) for t in runs]),
              ("noisy / clean summed-gradient norm, at its peak", [peak(t) for t in runs])]
    return lines


def warnings(runs: list[RunTables]) -> list[str]:
    """What the reader must know before any number: a run that did not memorize."""
    if runs[0].config.text:
        from memkern.report.text_page import text_warnings
        return text_warnings(runs)
    return [f"{t.name}: {caveat}" for t in runs
            if (caveat := findings.memorization_caveat(t.last))]


def describe(t: RunTables) -> str:
    c = t.config
    if c.text:
        from memkern.report.text_page import describe_text
        return describe_text(t)
    if c.imported:
        return f"{c.model} on {c.dataset}: weights imported (trained outside memkern)."
    return (f"{c.model} on {c.dataset}: {len(t.noise['noisy_indices'])} of "
            f"{t.noise['num_train']} training labels flipped (rate {c.noise}, seed {c.seed}), "
            f"{t.last['epoch']} epochs"
            + (f", example-tied dropout p_gen={c.p_gen} p_mem={c.p_mem}" if c.tied_dropout
               else "") + ".")


SECTIONS = (("training", "Training", training_cell),
            ("grads", "Gradient accounting", grads_cell),
            ("rewind", "Layer rewinding", rewind_cell),
            ("retrain", "Retraining one layer on clean data", retrain_cell),
            ("localize", "Localization: channels that flip an example", localize_cell),
            ("tied", "Example-tied dropout", tied_cell),
            ("scores", "Memorization scores", scores_cell))


def build_sections(runs: list[RunTables]) -> list[Section]:
    if runs[0].config.text:
        from memkern.report.text_page import text_sections
        return text_sections(runs)
    sections = [Section(key, title, CAPTIONS[key], [cell(t) for t in runs])
                for key, title, cell in SECTIONS]
    tied = [t for t in runs if t.tied]
    plain = [t for t in runs if not t.tied]
    if len(runs) == 2 and tied and plain:
        section = next(s for s in sections if s.key == "tied")
        section.joint = tied_joint(plain[0], tied[0])
        section.cells[runs.index(plain[0])] = Cell(
            plain[0].name, "Trained without tied dropout: the plain side of the comparison above.")
    return sections


def render(runs: list[RunTables]) -> str:
    """The page's HTML for one run or two side by side."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("memkern.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    sections = build_sections(runs)
    return env.get_template(TEMPLATE).render(
        title=" vs ".join(printable(t.name) for t in runs),
        runs=[(printable(t.name), describe(t)) for t in runs],
        headline=headline(runs), warnings=warnings(runs), sections=sections,
        configs=[(printable(t.name), json.dumps(json.loads(t.config.to_json()), indent=2))
                 for t in runs])


@locked(lambda a: hold_run(a["run"]))
def write_report(*, run: str | Path, compare: str | Path | None = None,
                 out: str | Path | None = None) -> Path:
    """Write ``index.html`` into ``out`` (default ``<run>/report``): the findings of ``run``,
    beside those of ``compare`` when given. Returns the page's path."""
    runs = [load_run_tables(run)]
    if compare is not None:
        if Path(compare).resolve() == Path(run).resolve():
            raise ConfigError(f"--compare names the same run as --run ({printable(str(run))}); "
                              f"pass another run, such as the tied-dropout one")
        runs.append(load_run_tables(compare))
        if runs[0].config.text != runs[1].config.text:
            raise ConfigError("--compare shows two runs of one kind side by side: pass two "
                              "text runs or two image runs")
    page = Path(out) if out is not None else runs[0].run.root / "report"
    index = page / "index.html"
    atomic_write_text(index, render(runs))
    return index
