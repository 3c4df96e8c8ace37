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


def decimals(text: str) -> int:
    return len(text.partition(".")[2])


def test_rewind_names_the_rewinding_that_undoes_memorization_while_test_holds():
    text = findings.rewind_finding(REWIND)
    final, critical = row(REWIND, "final", 30), row(REWIND, "block2", 3)
    last = row(REWIND, "head", 0)  # the last group rewound to the earliest epoch
    # block2 at epoch 3 is the last rewinding that lowers noisy accuracy by more than 0.05;
    # from epoch 9 on, none does.
    assert quoted(text) == [
        str(critical["epoch"]), two(critical["noisy_acc"]), two(critical["test_acc"]),
        two(final["noisy_acc"]), two(final["test_acc"]),
        "0.02", "0.05",  # the rule, quoted beside the rewinding it picked
        str(last["epoch"]), two(last["noisy_acc"]), two(last["test_acc"]),
        "9", "0.05"]
    assert (findings.TEST_HOLDS, findings.NOISY_DROPS) == (0.02, 0.05)
    assert in_order(text, "block2", "head")
    assert not any(g in text for g in ("block1", "block3", "hidden"))


def test_rewind_never_names_a_configuration_that_destroys_generalization():
    """Without a rewinding that keeps test accuracy within 0.02, there is no critical one: the
    finding gives the largest drop with its test cost instead of calling it the memory."""
    rows = [r for r in REWIND if r["epoch"] != 3]
    assert findings.rewind_critical(rows) is None
    text = findings.rewind_finding(rows)
    final, worst, last = row(rows, "final", 30), row(rows, "block2", 0), row(rows, "head", 0)
    assert min((r for r in rows if r["group"] != "final"), key=lambda r: r["noisy_acc"]) is worst
    assert quoted(text) == [
        "0.05", "0.02",  # the rule comes first: nothing qualified under it
        two(final["noisy_acc"]), two(final["test_acc"]),
        str(worst["epoch"]), two(worst["noisy_acc"]), two(worst["test_acc"]),  # with its test cost
        str(last["epoch"]), two(last["noisy_acc"]), two(last["test_acc"]),
        "9", "0.05"]
    assert final["test_acc"] - worst["test_acc"] > findings.TEST_HOLDS  # why it is not the memory
    assert in_order(text, "block2", "head")
    # A 0.03 test drop is over the rule even when it undoes the most memorization.
    hidden = {"group": "hidden", "epoch": 1, "clean_acc": 1.0, "noisy_acc": 0.17,
              "test_acc": REWIND[0]["test_acc"] - 0.03}
    critical = findings.rewind_critical(REWIND + [hidden])
    assert (critical["group"], critical["epoch"]) == ("block2", 3)
    assert findings.rewind_critical([r for r in REWIND if r["group"] != "final"]) is None


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


def test_accounting_reads_the_epoch_where_the_ratio_peaks():
    """One definition of the ratio: the finding and the headline quote the same peak."""
    text = findings.accounting_finding(GRADS)
    total = row(GRADS, "total", "5")
    groups = [r for r in GRADS if r["epoch"] == "5" and r["group"] != "total"]
    negative = [r["group"] for r in groups if float(r["cosine"]) < 0]
    assert negative == ["block1"]
    ratio = float(total["noisy_norm"]) / float(total["clean_norm"])
    assert quoted(text) == [
        two(ratio), "5", str(len({r["epoch"] for r in GRADS})),
        two(float(total["noisy_mean"]) / float(total["clean_mean"])),
        two(float(total["cosine"])), str(len(negative)), str(len(groups))]
    assert "block1" in text and "block3" not in text  # only the groups where it is negative
    assert findings.accounting_ratio_peak(GRADS) == (5, pytest.approx(ratio))
    assert ratio == pytest.approx(0.3827, abs=1e-4)
    later = [{**r, "epoch": "9", "noisy_norm": str(float(r["noisy_norm"]) / 10)} for r in GRADS
             if r["epoch"] == "5"]
    assert findings.accounting_ratio_peak(GRADS + later)[0] == 5
    assert quoted(findings.accounting_finding(GRADS + later))[1:3] == ["5", "3"]
    assert findings.accounting_finding([]) is None


def test_localization_compares_noisy_and_clean_and_names_the_favoured_site():
    text = findings.localization_finding(LOCALIZE)
    noisy, clean = LOCALIZE["groups"]["noisy"], LOCALIZE["groups"]["clean"]
    sites, base = LOCALIZE["sites"], LOCALIZE["base"]

    def flipped(g):  # a count, from the rate over the fitted targets
        return str(round(g["flip_rate"] * (g["count"] - g["unfitted"])))

    top = max(sites, key=lambda s: noisy["site_enrichment"][s])
    used = [s for s in sites if noisy["site_fraction"][s] > 0]
    assert top == "block1.pre"
    # "144 of 144" and "127 of 144" read as counts, medians as whole channels.
    assert quoted(text) == [
        f"{noisy['median_channels_flipped']:g}", flipped(noisy), str(noisy["count"]),
        f"{clean['median_channels_flipped']:g}", flipped(clean), str(clean["count"]),
        str(len(used)), str(len(sites)),
        two(noisy["site_enrichment"][top]),
        two(base["test_acc"] - noisy["edited_test_acc"]), two(base["test_acc"])]
    assert flipped(noisy) == "144" and flipped(clean) == "127"
    assert in_order(text, "noisy", "clean", top)
    assert not any(s in text for s in sites if s != top)
    no_noisy = {**LOCALIZE, "groups": {"noisy": {**noisy, "count": 0}}}
    assert findings.localization_finding(no_noisy) is None
    clean_only = {**LOCALIZE, "groups": {"clean": clean}}
    text = findings.localization_finding(clean_only)
    assert quoted(text) == [f"{clean['median_channels_flipped']:g}", flipped(clean),
                            str(clean["count"])]
    assert "clean" in text and not any(s in text for s in sites)


def test_localization_says_why_there_is_no_channel_count():
    """A 3-epoch mlp fits none of its flipped labels; a cap of 8 channels flips no clean one."""
    summary = {"sites": ["hidden.pre"], "groups": {
        "noisy": {"count": 3, "unfitted": 3, "flip_rate": None, "median_channels_flipped": None},
        "clean": {"count": 3, "unfitted": 0, "flip_rate": 0.0, "median_channels_flipped": None}}}
    text = findings.localization_finding(summary)
    assert quoted(text) == ["3", "3"] and "median" not in text and "hidden.pre" not in text
    assert in_order(text, "noisy", "clean")


def test_numbers_keep_the_digits_a_comparison_needs():
    assert findings.num(0.953) == "0.95" and findings.num(1.0) == "1.00"
    assert findings.num(0.9996) == "0.9996" and findings.num(0.004) == "0.004"
    assert findings.num(None) == "n/a"
    assert findings.separated([0.99, 0.991, 0.5]) == ["0.990", "0.991", "0.500"]
    assert findings.separated([0.25, 0.25, None]) == ["0.25", "0.25", "n/a"]


def test_a_run_that_did_not_memorize_says_so_first():
    """Noisy-train accuracy 0.10: every finding that needs memorization opens with the caveat."""
    weak = {**PLAIN_LAST, "noisy_acc": 0.1}
    caveat = findings.memorization_caveat(weak)
    assert quoted(caveat) == [two(weak["noisy_acc"]), str(findings.MEMORIZED)]
    finding = findings.rewind_finding(REWIND)
    text = findings.caveated(finding, weak)
    # the caveat opens the finding, which follows unchanged
    assert text.endswith(finding) and len(text) > len(finding)
    assert quoted(text) == [two(weak["noisy_acc"])] + quoted(finding)
    assert findings.memorization_caveat(PLAIN_LAST) is None
    assert findings.caveated("x", PLAIN_LAST) == "x" and findings.caveated(None, weak) is None


def test_tied_sentences_quote_own_keep_and_drop():
    tied, plain = TIED_LAST, PLAIN_LAST
    assert quoted(findings.tied_drop_finding(tied)) == [
        two(tied["noisy_acc"]), two(tied["noisy_acc_drop"]), two(tied["noisy_acc_keep"]),
        two(tied["clean_acc"]), two(tied["clean_acc_drop"]),
        two(tied["test_acc"]), two(tied["test_acc_drop"])]
    text = findings.comparison_finding(plain, tied)
    same_epochs = [
        two(plain["noisy_acc"]), two(plain["test_acc"]),
        two(tied["noisy_acc"]), two(tied["noisy_acc_drop"]), two(tied["test_acc_drop"]),
        two(plain["clean_acc"] - plain["test_acc"]),
        two(tied["clean_acc_drop"] - tied["test_acc_drop"])]
    # the epoch-difference clause appears only when the epochs differ
    assert quoted(text) == same_epochs + [str(plain["epoch"]), str(tied["epoch"])]
    assert in_order(text, "plain", "tied")
    same = findings.comparison_finding({**plain, "epoch": tied["epoch"]}, tied)
    assert quoted(same) == same_epochs
    # No claim about where memorization sits when dropping changes little.
    assert "sits in" in text
    weak = {**tied, "noisy_acc_drop": 0.9}
    assert "sits in" not in findings.comparison_finding(plain, weak)


def test_scores_finding_ranks_signals_that_score_everyone():
    """Rows of the demo's plain run's scores/benchmark.csv (`memkern scores --benchmark
    --folds 0`), as written; channels_to_flip covers only the 288 localized examples."""
    rows = [{"method": "variability", "covered": "1437", "auroc": "0.9998", "ap": "0.9983"},
            {"method": "memorization_score", "covered": "1437", "auroc": "0.9815", "ap": "0.8526"},
            {"method": "forgetting_events", "covered": "1437", "auroc": "0.764", "ap": "0.2902"},
            {"method": "channels_to_flip", "covered": "288", "auroc": "0.864", "ap": "0.8355"}]

    def expected(named):
        """The count line, then each named signal's AUROC and average precision, with the
        digits that tell the compared values apart (findings.separated)."""
        everyone = [r for r in rows if r["covered"] == "1437"]
        aurocs = findings.separated([float(r["auroc"]) for r in named])
        aps = findings.separated([float(r["ap"]) for r in named])
        return [str(len(everyone)), "1437"] + [q for pair in zip(aurocs, aps) for q in pair]

    def check_digits(values, named, key):
        """Each quoted value reads as its own, no two alike, none short of 1 printed as 1."""
        assert len(set(values)) == len(values) and len({decimals(v) for v in values}) == 1
        for v, r in zip(values, named):
            assert abs(float(v) - float(r[key])) <= 0.5 * 10 ** -decimals(v) and float(v) < 1

    text = findings.scores_finding(rows)
    named = [rows[0], rows[1]]  # the best, then the combined score (forgetting_events is neither)
    assert quoted(text) == expected(named)
    check_digits(quoted(text)[2::2], named, "auroc")
    check_digits(quoted(text)[3::2], named, "ap")
    assert in_order(text, "variability", "memorization_score")
    assert "forgetting_events" not in text and "channels_to_flip" not in text  # 288 < 1437
    # digits enough to tell apart what is compared, never 1.00 for less than 1
    close = rows[:1] + [{**rows[2], "method": "cleanlab", "auroc": "0.9991"}] + rows[1:2]
    text = findings.scores_finding(close)
    assert quoted(text) == expected(close)
    check_digits(quoted(text)[2::2], close, "auroc")
    assert quoted(text)[2] != quoted(text)[4]  # 0.9998 and 0.9991 stay apart
    check_digits(quoted(text)[3::2], close, "ap")
    assert in_order(text, "variability", "cleanlab", "memorization_score")
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
    base = next(r for r in rows if r["group"] == "final")
    num = findings.num  # a fresh run's values may sit near 0 or 1: the module's digits
    if critical is None:  # nothing memorized to undo: the largest drop, with its test cost
        worst = min((r for r in rows if r["group"] != "final"),
                    key=lambda r: (r["noisy_acc"], r["epoch"]))
        assert quoted(text)[:7] == ["0.05", "0.02", num(base["noisy_acc"]), num(base["test_acc"]),
                                    str(worst["epoch"]), num(worst["noisy_acc"]),
                                    num(worst["test_acc"])]
        assert worst["group"] in text
    else:
        assert quoted(text)[:5] == [str(critical["epoch"]), num(critical["noisy_acc"]),
                                    num(critical["test_acc"]), num(base["noisy_acc"]),
                                    num(base["test_acc"])]
        assert critical["group"] in text
    last = RunDir(run).load_metrics()[-1]
    text = findings.training_finding(last, epochs=3, noisy=144, train=1437)
    assert quoted(text)[:6] == ["3", num(last["clean_acc"]), num(last["noisy_acc"]), "144", "1437",
                                num(last["test_acc"])]
