"""`memkern report` on real runs: a plain and a tied-dropout digits MLP, each with gradient
accounting, rewinding, retraining and a few localized examples (built once for the module),
rendered alone and side by side, and checked in headless Chromium when one is installed."""
import base64
import html
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from memkern.report import findings
from memkern.cli.main import main
from memkern.training.config import TrainConfig
from memkern.report.page import write_report
from memkern.report.run_tables import load_run_tables
from memkern.rundir.paths import RunDir
from memkern.report.summaries import run_findings
from memkern.rundir.csv_tables import read_csv, read_table

from browser_checks import find_browser, probe_page, screenshot

SECTION_ORDER = ["training", "grads", "rewind", "retrain", "localize", "tied", "scores"]


def _analysed(root, name, config, *, scores=False):
    from memkern.experiments.gradients.run import gradient_accounting
    from memkern.experiments.localize.run import localize
    from memkern.experiments.retrain.run import retrain
    from memkern.experiments.rewind.run import rewind
    from memkern.training.train import train

    run = root / name
    train(config, out=run, device="cpu", progress=False)
    gradient_accounting(run=run, epochs=[0, config.epochs], device="cpu", progress=False)
    rewind(run=run, device="cpu", progress=False)
    retrain(run=run, epochs=1, device="cpu", progress=False)
    final = RunDir(run).final_checkpoint()
    for examples in ("noisy", "clean"):
        localize(ckpt=final, examples=examples, limit=3, ref_batch=64, max_channels=8,
                 device="cpu", progress=False)
    if scores:
        from memkern.experiments.scores.run import score_run
        score_run(run=run, benchmark=True, folds=0, device="cpu", progress=False)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real 3-epoch runs, plain and tied, with every analysis (scores on the plain one only:
    the tied run shows the missing section), about 30 s."""
    root = tmp_path_factory.mktemp("report")
    return (_analysed(root, "plain", TrainConfig(model="mlp", epochs=3, noise=0.1), scores=True),
            _analysed(root, "tied", TrainConfig(model="mlp", epochs=3, noise=0.1,
                                                tied_dropout=True)))


@pytest.fixture(scope="module")
def pages(runs, tmp_path_factory):
    plain, tied = runs
    single = write_report(run=plain)
    both = write_report(run=plain, compare=tied, out=tmp_path_factory.mktemp("both"))
    return single, both


def text_of(page) -> str:
    """The page's visible text, tags dropped and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))


def sections(source: str) -> list[str]:
    return re.findall(r'<section id="\w+">(.*?)</section>', source, re.S)


def squeeze(text: str) -> str:
    return " ".join(text.split())


def test_sections_follow_the_method_with_caption_and_finding_or_missing(pages):
    single, _ = pages
    page = single.read_text()
    assert single == single.parent.parent / "report" / "index.html"
    assert re.findall(r'<section id="(\w+)">', page) == SECTION_ORDER
    for key, body in zip(SECTION_ORDER, sections(page)):
        assert '<p class="caption">' in body, key
        if key == "tied":  # a plain run: listed as missing, with what to do
            assert '<p class="missing">Missing:' in body, key
        else:
            assert '<p class="finding">' in body and "Missing:" not in body, key
    assert "not a tied-dropout run" in page


def test_findings_quote_the_runs_own_tables(runs, pages):
    plain, _ = runs
    text = squeeze(text_of(pages[0]))
    for sentence in (findings.rewind_finding(read_table(plain / "rewind.csv")),
                     findings.retrain_finding(read_table(plain / "retrain.csv")),
                     findings.accounting_finding(read_csv(plain / "grads" / "summary.csv")),
                     findings.scores_finding(read_csv(plain / "scores" / "benchmark.csv"))):
        assert sentence and squeeze(sentence) in text
    last = RunDir(plain).load_metrics()[-1]
    assert f"test accuracy is {findings.num(last['test_acc'])}" in text


def test_commands_print_the_pages_sentences_once_each(runs, pages):
    """run_findings (what `memkern demo` prints) says what the page says, each thing once."""
    for run, page in zip(runs, (pages[0], pages[1])):
        t = load_run_tables(run)
        lines = run_findings(run)
        caveat = findings.memorization_caveat(t.last)
        expected = 5 + bool(caveat) + bool(t.benchmark) + bool(
            findings.tied_share_finding(t.localize))
        assert len(lines) == expected and len(set(lines)) == len(lines), lines
        assert lines[0] == caveat if caveat else lines[0].startswith("After 3 epochs")
        text = squeeze(text_of(page))
        assert all(squeeze(line) in text for line in lines)
    assert any("memorization channels dropped" in line for line in run_findings(runs[1]))


def test_key_tables_are_rendered(runs, pages):
    plain, _ = runs
    text = squeeze(text_of(pages[0]))
    grads = read_csv(plain / "grads" / "summary.csv")
    assert f"grads/summary.csv ({len(grads)} rows): summed gradients" in text
    assert "median ch." in text and "where the zeroed channels sit" in text
    assert "noisy-train accuracy after rewinding" in text and "at the reset and after" in text
    assert "Headline numbers" in text


def test_page_is_self_contained(pages):
    for page in pages:
        source = page.read_text()
        sources = re.findall(r'<img src="([^"]+)"', source)
        assert len(sources) >= 6
        for src in sources:
            assert src.startswith("data:image/png;base64,")
            assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert not re.search(r'(src|href)="(https?:)?//', source)
        assert "<link" not in source and "<script" not in source


def test_compare_puts_plain_and_tied_side_by_side(runs, pages):
    plain, tied = runs
    text = squeeze(text_of(pages[1]))
    plain_last, tied_last = (RunDir(r).load_metrics()[-1] for r in runs)
    assert squeeze(findings.comparison_finding(plain_last, tied_last)) in text
    assert "tied, memorization channels dropped" in text
    assert "Generalization gap" in text
    assert "Missing: no memorization scores: memkern scores --run" in text  # the tied run
    # every section has one cell per run
    source = pages[1].read_text()
    assert len(sections(source)) == len(SECTION_ORDER)
    for body in sections(source):
        assert body.count("<h3>plain</h3>") == 1 and body.count("<h3>tied</h3>") == 1


def test_bad_compare_is_one_clear_line(runs, tmp_path):
    plain, _ = runs
    for other, words in ((plain, "same run"), (tmp_path / "nowhere", "no config.json")):
        result = CliRunner().invoke(main, ["report", "--run", str(plain), "--compare", str(other)])
        assert result.exit_code == 2 and words in result.output, result.output
        assert result.output.startswith("memkern: error:") and result.output.count("\n") == 1


@pytest.mark.parametrize("name,damage,words", [
    ("localize.summary.json", '{"groups": {"noisy": {}}, "sites": []}', "rerun memkern localize"),
    ("grads/summary.csv", "epoch,group\n0,head\n", "rerun memkern grads"),
    ("scores/benchmark.csv", "method,covered,auroc,ap\nx,many,0.5,0.5\n", "not numbers"),
    ("rewind.csv", "group,epoch\n", "not a memkern accuracy table")])
def test_a_damaged_table_is_one_clear_line(runs, tmp_path, name, damage, words):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run, ignore=shutil.ignore_patterns("report"))
    (run / name).write_text(damage)
    result = CliRunner().invoke(main, ["report", "--run", str(run)])
    assert result.exit_code == 2 and words in result.output, result.output
    assert result.output.count("\n") == 1 and not (run / "report" / "index.html").exists()


browser = find_browser()
needs_browser = pytest.mark.skipif(browser is None, reason="no headless Chromium on PATH "
                                   "(Debian: apt-get install chromium)")


@needs_browser
@pytest.mark.parametrize("width", [1280, 800])
def test_chromium_shows_every_figure_near_its_drawn_size_and_cuts_no_table(pages, tmp_path,
                                                                          width):
    """Two runs side by side at 1280 px, one column at 800 px: every figure decodes and shows at
    70% of its drawn width or more, no table is wider than its block, nothing overflows."""
    for page in pages:
        seen = probe_page(page, width=width, workdir=tmp_path, browser=browser)
        assert seen["images"] == page.read_text().count("<img ")
        assert seen["broken"] == [] and seen["shrunk"] == [] and seen["cut"] == [], seen
        assert seen["sticking"] == [] and seen["scroll_width"] <= seen["width"], seen
    shots = os.environ.get("MEMKERN_SCREENSHOTS")  # a folder: keep a look at both widths
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        for name, page in zip(("single", "compare"), pages):
            screenshot(page, Path(shots) / f"{name}_{width}.png", width=width, height=2000,
                       browser=browser)


@needs_browser
def test_at_phone_width_wide_tables_scroll_in_their_block_and_the_page_does_not(pages, tmp_path):
    """At 400 px a table of many columns is wider than the screen: it scrolls inside its own
    block (``.wide``), so the page itself never scrolls sideways and every figure still loads."""
    for page in pages:
        seen = probe_page(page, width=400, workdir=tmp_path, browser=browser)
        assert seen["broken"] == [] and seen["scroll_width"] <= seen["width"], seen


@needs_browser
def test_the_probe_sees_a_broken_figure_and_an_overflow(tmp_path):
    """The check above can fail: a figure that does not decode and a too-wide block."""
    page = tmp_path / "bad.html"
    pixel = base64.b64encode(_png(1000, 10)).decode()
    page.write_text('<html><body><img alt="bad" src="data:image/png;base64,AAAA">'
                    f'<div style="width: 300px"><img alt="small" src="data:image/png;base64,{pixel}"'
                    ' style="max-width: 100%"></div>'
                    '<div style="width: 200px"><p>narrow</p><table><tr><td style="white-space: '
                    'nowrap">a cell far wider than the block that holds it</td></tr></table></div>'
                    '<div style="width: 3000px">wide</div></body></html>')
    seen = probe_page(page, width=800, workdir=tmp_path, browser=browser)
    assert seen["broken"] == ["bad"] and "div" in seen["sticking"]
    assert seen["shrunk"] == ["small: 300 of 1000 px"] and seen["cut"] == ["narrow"], seen
    assert seen["scroll_width"] > seen["width"]


def _png(width: int, height: int) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width / 100, height / 100))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def test_page_warns_first_states_its_settings_and_sizes_figures_as_drawn(runs, pages):
    """A 3-epoch mlp memorized almost nothing: the page says so before any number; the
    localization says how it was computed and how to add targets alike; every figure carries
    the size it was drawn at and enlarges on a click."""
    from memkern.report.page import png_size

    plain, _ = runs
    source = pages[0].read_text()
    text = squeeze(text_of(pages[0]))
    last = RunDir(plain).load_metrics()[-1]
    caveat = findings.memorization_caveat(last)
    if caveat:
        assert source.index('class="warning"') < source.index("Headline numbers")
        assert caveat in text
        short = f"No memorization to find (the model fits {findings.num(last['noisy_acc'])} of"
        assert text.count(short) >= 8  # every finding that needs memorization, twice
    assert ("Computed with greedy on epoch_003.safetensors, reference batch 64, at most 8 "
            "channels") in text
    assert f"memkern localize --run {plain} --max-channels 8 --ref-batch 64" in text
    assert "test accuracy within 0.02 of the final model's" in text
    for tag in re.findall(r"<figure id=\"([^\"]+)\"[^>]*><a class=\"zoom\" href=\"#\1\"[^>]*>"
                          r"(<img [^>]+>)", source):
        fid, img = tag
        data = base64.b64decode(re.search(r'base64,([^"]+)"', img).group(1))
        width, height = png_size(data)
        assert f'width="{width}" height="{height}"' in img and width <= 760, fid
    assert source.count('class="zoom"') == source.count("<img ") >= 6
