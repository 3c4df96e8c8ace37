"""The localize summary's numbers a reader compares: the tied-dropout own-channel enrichment
against the channels active for each target (memkern.experiments.localize.summary), counts
printed as counts, and only the groups that were asked for."""
import pytest
import torch

from memkern.experiments.localize.summary import (BOOTSTRAP, enrichment_text, format_table,
                                                  summarize)
from memkern.kernels.channel_mask_reference import generalization_channels, tied_mask_values

TIED = {"s": {"channels": 40, "seed": 7, "p_gen": 0.25, "p_mem": 0.3}}
ACC = {"clean_acc": 1.0, "noisy_acc": 0.5, "test_acc": 0.9}


def _kinds(index: int) -> tuple[list[int], list[int], list[int]]:
    """Generalization, own kept and other (off for the target) channels of ``index`` at "s"."""
    kept = tied_mask_values(torch.tensor([index]), mode="own", **TIED["s"])[0].bool()
    gen = generalization_channels(TIED["s"]["p_gen"], TIED["s"]["channels"])
    own = [c for c in range(gen, len(kept)) if kept[c]]
    off = [c for c in range(gen, len(kept)) if not kept[c]]
    return list(range(gen)), own, off


def _row(index: int, channels: list[int], noisy: bool = True) -> dict:
    return {"index": index, "noisy": noisy, "flipped": True, "n_channels": len(channels),
            "channels": [["s", c] for c in channels], **ACC}


def test_tied_enrichment_is_against_the_channels_active_for_each_target():
    """Baseline per target: own kept / (generalization + own kept), from its own mask; channels
    already off for the target are counted apart, not as misses."""
    rows, own_zeroed, expected = [], 0, 0.0
    for index in range(12):
        gen, own, off = _kinds(index)
        share = len(own) / (len(gen) + len(own))
        zeroed = own[:2] + gen[:1] + off[:1]  # 2 own, 1 generalization: 3 active, 1 off
        rows.append(_row(index, zeroed))
        own_zeroed += 2
        expected += 3 * share
    t = summarize(rows, site_order=["s"], tied=TIED)["groups"]["noisy"]["tied"]
    assert (t["zeroed"], t["active"], t["inactive"], t["own"]) == (48, 36, 12, 24)
    assert t["own_share"] == pytest.approx(24 / 36)
    assert t["active_baseline"] == pytest.approx(expected / 36)
    assert t["enrichment"] == pytest.approx(own_zeroed / expected)
    # the old baseline (own kept among all channels) would have been far lower
    assert t["active_baseline"] > 1.5 * sum(len(_kinds(i)[1]) for i in range(12)) / (12 * 40)
    lo, hi = t["enrichment_ci"]
    assert lo <= t["enrichment"] <= hi and hi > lo
    again = summarize(rows, site_order=["s"], tied=TIED)["groups"]["noisy"]["tied"]
    assert again["enrichment_ci"] == t["enrichment_ci"]  # seeded bootstrap
    assert enrichment_text(t) == f"{t['enrichment']:.2f}x (95% CI {lo:.2f}-{hi:.2f})"
    assert BOOTSTRAP >= 1000


def test_generalization_channels_only_is_a_depletion_with_an_interval_below_one():
    """Clean targets flipped through generalization channels alone: enrichment 0 to 1."""
    rows = [_row(i, _kinds(i)[0][:3] + _kinds(i)[1][:(i % 4 == 0)], noisy=False)
            for i in range(40)]
    t = summarize(rows, site_order=["s"], tied=TIED)["groups"]["clean"]["tied"]
    assert 0 < t["enrichment"] < 1 and t["enrichment_ci"][1] < 1
    assert t["own"] == 10 and t["active"] == 130


def test_summary_prints_counts_and_only_the_groups_asked_for():
    rows = [_row(i, _kinds(i)[1][:2]) for i in range(3)]
    rows[2]["flipped"] = False
    s = summarize(rows, site_order=["s"], tied=TIED, selection="noisy, at most 3",
                  settings={"method": "greedy", "checkpoint": "epoch_010.safetensors",
                            "ref_batch": 128, "max_channels": 50, "eot": 0, "seed": 0})
    assert list(s["groups"]) == ["noisy"]
    text = format_table(s)
    lines = text.splitlines()
    assert lines[0] == ("greedy on epoch_010.safetensors, reference batch 128, at most 50 "
                        "channels, eot 0, seed 0; targets: noisy, at most 3")
    assert lines[2].split()[:5] == ["noisy", "3", "0", "2", "of"]
    assert not any(line.startswith("clean") for line in lines)
    assert "own 1.000" in text and "enrichment" in text
    assert summarize([], site_order=["s"])["groups"] == {}
