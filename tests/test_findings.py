"""The report's sentences (memkern.report.findings) on numbers taken from real runs: the plain and tied
runs of `memkern demo` (digits cnn, 10% noise, seed 0; rows copied as the commands wrote them)
and a fresh tiny run, whose sentences must quote its own tables.

Each sentence is checked for the numbers it quotes, in order, computed here from the rows, and
for the names it gives: a rewording passes, a wrong number or a wrong group fails."""
import re

import pytest

from memkern.report import findings
from memkern.rundir.csv_tables import read_table

# `memkern demo`, plain run: rewind.csv (final row, epochs 0 and 3), as written.
REWIND = [
    {"group": "final", "epoch": 30, "clean_acc": 1.0, "noisy_acc": 1.0, "test_acc": 0.9527778029441833},
    {"group": "block1", "epoch": 0, "clean_acc": 0.9466357231140137, "noisy_acc": 0.375, "test_acc": 0.9083333611488342},
    {"group": "block2", "epoch": 0, "clean_acc": 0.7324052453041077, "noisy_acc": 0.1458333283662796, "test_acc": 0.7083333134651184},
    {"group": "block3", "epoch": 0, "clean_acc": 0.7246713042259216, "noisy_acc": 0.2847222089767456, "test_acc": 0.7222222089767456},
    {"group": "hidden", "epoch": 0, "clean_acc": 0.9203402996063232, "noisy_acc": 0.5972222089767456, "test_acc": 0.8111110925674438},
    {"group": "head", "epoch": 0, "clean_acc": 1.0, "noisy_acc": 1.0, "test_acc": 0.949999988079071},
    {"group": "block1", "epoch": 3, "clean_acc": 0.9992266297340393, "noisy_acc": 0.9652777910232544, "test_acc": 0.9416666626930237},
    {"group": "block2", "epoch": 3, "clean_acc": 0.9976798295974731, "noisy_acc": 0.3888888955116272, "test_acc": 0.9555555582046509},
    {"group": "block3", "epoch": 3, "clean_acc": 1.0, "noisy_acc": 0.6041666865348816, "test_acc": 0.9583333134651184},
    {"group": "hidden", "epoch": 3, "clean_acc": 1.0, "noisy_acc": 0.6458333134651184, "test_acc": 0.9555555582046509},
    {"group": "head", "epoch": 3, "clean_acc": 1.0, "noisy_acc": 1.0, "test_acc": 0.9416666626930237},
    {"group": "block2", "epoch": 9, "clean_acc": 1.0, "noisy_acc": 1.0, "test_acc": 0.9583333134651184},
]

# The same run's retrain.csv: each group at the reset and after 10 epochs on clean data.
RETRAIN = [
    {"group": "block1", "epoch": 0, "clean_acc": 0.9466357231140137, "noisy_acc": 0.375, "test_acc": 0.9083333611488342},
    {"group": "block1", "epoch": 10, "clean_acc": 1.0, "noisy_acc": 0.9652777910232544, "test_acc": 0.9583333134651184},
    {"group": "block2", "epoch": 0, "clean_acc": 0.7324052453041077, "noisy_acc": 0.1458333283662796, "test_acc": 0.7083333134651184},
    {"group": "block2", "epoch": 10, "clean_acc": 1.0, "noisy_acc": 0.0069444444961845875, "test_acc": 0.9916666746139526},
    {"group": "head", "epoch": 0, "clean_acc": 1.0, "noisy_acc": 1.0, "test_acc": 0.949999988079071},
    {"group": "head", "epoch": 10, "clean_acc": 1.0, "noisy_acc": 0.9375, "test_acc": 0.9583333134651184},
]

# grads/summary.csv rows (strings, as read back) at epochs 0 and 5: two groups and the total.
GRADS = [
    {"epoch": "0", "group": "block1", "clean_norm": "0.009399036239456628", "noisy_norm": "0.0007124303598823313", "cosine": "-0.2373208289209458", "clean_mean": "0.08764133796568352", "noisy_mean": "0.085504450266146"},
    {"epoch": "0", "group": "total", "clean_norm": "0.16738510453958283", "noisy_norm": "0.012825339268207864", "cosine": "-0.17812567647790814", "clean_mean": "2.0003061914112066", "noisy_mean": "1.9973341988192663"},
    {"epoch": "5", "group": "block1", "clean_norm": "0.38927419328067203", "noisy_norm": "0.12572999197665022", "cosine": "-0.2906739983084926", "clean_mean": "1.2538008815598114", "noisy_mean": "6.409577711588806"},
    {"epoch": "5", "group": "block3", "clean_norm": "1.1067793017003196", "noisy_norm": "0.4790436359714668", "cosine": "0.08862693328200132", "clean_mean": "4.342984476968378", "noisy_mean": "23.761190500524307"},
    {"epoch": "5", "group": "total", "clean_norm": "1.9975137364852158", "noisy_norm": "0.7644820400615021", "cosine": "0.02412643115182322", "clean_mean": "7.644606194997672", "noisy_mean": "42.38594066434436"},
]

# localize_summary.json of the plain run (the fields the sentence reads).
LOCALIZE = {
    "sites": ["block1.pre", "block2.pre", "block3.pre", "hidden.pre"],
    "base": {"clean_acc": 1.0, "noisy_acc": 1.0, "test_acc": 0.9527778029441833},
    "groups": {
        "noisy": {"count": 144, "unfitted": 0, "flip_rate": 1.0, "median_channels_flipped": 4.0,
                  "edited_test_acc": 0.9300347218910853,
                  "site_fraction": {"block1.pre": 0.41594202898550725, "block2.pre": 0.463768115942029,
                                    "block3.pre": 0.04492753623188406, "hidden.pre": 0.07536231884057971},
                  "site_enrichment": {"block1.pre": 6.239130434782608, "block2.pre": 3.4782608695652173,
                                      "block3.pre": 0.16847826086956522, "hidden.pre": 0.14130434782608697}},
        "clean": {"count": 144, "unfitted": 0, "flip_rate": 0.8819444444444444, "median_channels_flipped": 8},
    },
}

# Final metrics.jsonl lines of the demo's plain (30 epochs) and tied (10 epochs) runs
# (the tied line without its lr, seconds and loss).
PLAIN_LAST = {"epoch": 30, "clean_acc": 1.0, "noisy_acc": 1.0, "test_acc": 0.9527778029441833}
TIED_LAST = {"clean_acc": 1.0, "clean_acc_drop": 0.9930394291877747,
             "clean_acc_keep": 0.9984531998634338, "epoch": 10, "noisy_acc": 1.0,
             "noisy_acc_drop": 0.0069444444961845875, "noisy_acc_keep": 0.0069444444961845875,
             "test_acc": 0.9833333492279053, "test_acc_drop": 0.9833333492279053,
             "test_acc_keep": 0.9833333492279053}


NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")


def quoted(text: str) -> list[str]:
    """The numbers a sentence quotes, in order (digits inside names such as block2 excluded)."""
    return NUMBER.findall(text)


def two(value: float) -> str:
    return f"{value:.2f}"


def row(rows, group, epoch):
    return next(r for r in rows if r["group"] == group and r["epoch"] == epoch)


def in_order(text: str, *names: str) -> bool:
    return all(n in text for n in names) and \
        [text.index(n) for n in names] == sorted(text.index(n) for n in names)


def test_rewind_names_the_rewinding_that_undoes_memorization_while_test_holds():
    text = findings.rewind_finding(REWIND)
    # among configurations keeping test accuracy within 0.02 of the final model's, block2 at
    # epoch 3 has the lowest noisy accuracy; head at epoch 0 is the last group's earliest
    # rewind; from epoch 9 on no rewind lowers noisy accuracy by more than 0.05
    critical, final, head = row(REWIND, "block2", 3), row(REWIND, "final", 30), row(REWIND, "head", 0)
    assert quoted(text) == ["3", two(critical["noisy_acc"]), two(critical["test_acc"]),
                            two(final["noisy_acc"]), two(final["test_acc"]), "0",
                            two(head["noisy_acc"]), "9", "0.05"]
    assert in_order(text, "block2", "head") and "stays" in text


def test_rewind_without_a_selective_configuration_falls_back_to_the_earliest_epoch():
    rows = [r for r in REWIND if r["epoch"] != 3]
    critical = findings.rewind_critical(rows)
    assert (critical["group"], critical["epoch"]) == ("block2", 0)
    text = findings.rewind_finding(rows)
    assert text.startswith("Rewinding block2") and "stays" not in text  # test accuracy fell
    assert quoted(text)[:3] == ["0", two(critical["noisy_acc"]), two(critical["test_acc"])]


def test_retrain_names_the_groups_noisy_accuracy_returns_most_and_least_for():
    text = findings.retrain_finding(RETRAIN)
    most, least = (row(RETRAIN, "block1", 0), row(RETRAIN, "block1", 10)), \
        (row(RETRAIN, "block2", 0), row(RETRAIN, "block2", 10))
    assert quoted(text) == [two(most[0]["noisy_acc"]), two(most[1]["noisy_acc"]), "10",
                            two(least[1]["noisy_acc"]), two(least[0]["noisy_acc"]), "1.00"]
    assert in_order(text, "block1", "block2") and "head" not in text
    lower = [{**r, "clean_acc": 0.9} if r["group"] == "block2" else r for r in RETRAIN]
    assert quoted(findings.retrain_finding(lower))[-1] == "0.90"
    assert findings.retrain_finding([r for r in RETRAIN if r["epoch"] == 0]) is None


def test_accounting_reads_the_first_trained_epoch():
    text = findings.accounting_finding(GRADS)
    total = next(r for r in GRADS if r["epoch"] == "5" and r["group"] == "total")
    f = {k: float(v) for k, v in total.items() if k not in ("epoch", "group")}
    # epoch 5 (the first trained one), the ratios of sums and of means, the total cosine, and
    # 1 of the 2 groups with a negative cosine
    assert quoted(text) == ["5", two(f["noisy_norm"] / f["clean_norm"]),
                            two(f["noisy_mean"] / f["clean_mean"]), two(f["cosine"]), "1", "2"]
    assert "block1" in text and "block3" not in text
    assert findings.accounting_ratio_peak(GRADS) == (5, pytest.approx(0.3827, abs=1e-4))
    assert findings.accounting_finding([]) is None


def test_localization_compares_noisy_and_clean_and_names_the_favoured_site():
    text = findings.localization_finding(LOCALIZE)
    noisy, clean = LOCALIZE["groups"]["noisy"], LOCALIZE["groups"]["clean"]
    assert quoted(text) == [
        "4", two(noisy["flip_rate"]), "144", "8", two(clean["flip_rate"]), "144",
        "4", "4",  # sites used of sites
        two(noisy["site_enrichment"]["block1.pre"]),  # the most enriched site
        two(LOCALIZE["base"]["test_acc"] - noisy["edited_test_acc"]),
        two(LOCALIZE["base"]["test_acc"])]
    assert in_order(text, "noisy", "clean", "block1.pre")
    no_noisy = {**LOCALIZE, "groups": {"noisy": {**noisy, "count": 0}}}
    assert findings.localization_finding(no_noisy) is None


def test_localization_says_why_there_is_no_channel_count():
    """A 3-epoch mlp fits none of its flipped labels; a cap of 8 channels flips no clean one."""
    summary = {"sites": ["hidden.pre"], "groups": {
        "noisy": {"count": 3, "unfitted": 3, "flip_rate": None, "median_channels_flipped": None},
        "clean": {"count": 3, "unfitted": 0, "flip_rate": 0.0, "median_channels_flipped": None}}}
    text = findings.localization_finding(summary)
    assert quoted(text) == ["3", "3"] and "median" not in text and "hidden.pre" not in text
    assert in_order(text, "noisy", "clean")


def test_tied_sentences_quote_own_keep_and_drop():
    t = TIED_LAST
    assert quoted(findings.tied_drop_finding(t)) == [
        two(t["noisy_acc"]), two(t["noisy_acc_drop"]), two(t["noisy_acc_keep"]),
        two(t["clean_acc"]), two(t["clean_acc_drop"]), two(t["test_acc"]), two(t["test_acc_drop"])]
    text = findings.comparison_finding(PLAIN_LAST, t)
    assert quoted(text) == [
        two(PLAIN_LAST["noisy_acc"]), two(PLAIN_LAST["test_acc"]), two(t["noisy_acc"]),
        two(t["noisy_acc_drop"]), two(t["test_acc_drop"]),
        two(PLAIN_LAST["clean_acc"] - PLAIN_LAST["test_acc"]),
        two(t["clean_acc_drop"] - t["test_acc_drop"])]
    assert "sits in" in text  # dropping the channels undoes the fit of the flipped labels
    # No claim about where memorization sits when dropping changes little.
    weak = {**t, "noisy_acc_drop": 0.9}
    assert "sits in" not in findings.comparison_finding(PLAIN_LAST, weak)


def test_scores_finding_ranks_signals_that_score_everyone():
    """Rows of the demo's plain run's scores/benchmark.csv (`memkern scores --benchmark
    --folds 0`), as written; channels_to_flip covers only the 288 localized examples."""
    rows = [{"method": "variability", "covered": "1437", "auroc": "0.9998", "ap": "0.9983"},
            {"method": "memorization_score", "covered": "1437", "auroc": "0.9815", "ap": "0.8526"},
            {"method": "forgetting_events", "covered": "1437", "auroc": "0.764", "ap": "0.2902"},
            {"method": "channels_to_flip", "covered": "288", "auroc": "0.864", "ap": "0.8355"}]
    text = findings.scores_finding(rows)
    # 3 signals cover all 1437 examples; the best of them, then the combined score
    assert quoted(text) == ["3", "1437", two(0.9998), two(0.9983), two(0.9815), two(0.8526)]
    assert in_order(text, "variability", "memorization_score") and "channels_to_flip" not in text
    assert findings.scores_finding([{"method": "x", "covered": "5", "auroc": "", "ap": ""}]) is None
    assert findings.scores_finding([]) is None


def test_sentences_quote_a_fresh_runs_own_tables(tiny_run, tmp_path):
    """A real 3-epoch run: the training and rewind sentences carry its numbers."""
    import shutil

    from memkern.experiments.rewind.run import rewind
    from memkern.rundir.paths import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rewind(run=run, device="cpu", progress=False)
    rows = read_table(run / "rewind.csv")
    text = findings.rewind_finding(rows)
    critical = findings.rewind_critical(rows)
    assert f"Rewinding {critical['group']} to epoch {critical['epoch']}" in text
    assert findings.num(critical["noisy_acc"]) in text
    last = RunDir(run).load_metrics()[-1]
    text = findings.training_finding(last, epochs=3, noisy=144, train=1437)
    assert f"fits {findings.num(last['clean_acc'])} of the clean" in text
    assert f"test accuracy is {findings.num(last['test_acc'])}" in text
