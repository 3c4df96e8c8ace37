"""CI guard: the quick ratios of ``ratios.py`` measured now against those committed in
``ratios.json``. A ratio fails when it is worse than its recorded value by more than its noise
margin (a fraction of the value, set from five runs on the shared 2-core machine; both are in
ratios.json and bench/README.md). Rerecord after a deliberate change with
``python bench/ratios.py --size quick --runs 5 --record`` then
``python bench/perf_table.py --write``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ratios import better, measure_one

RECORDED = json.loads((Path(__file__).parent / "ratios.json").read_text())["quick"]


def allowed(name: str) -> float:
    """The worst value that still passes: the recorded value moved by the margin."""
    value, margin = RECORDED[name]["value"], RECORDED[name]["margin"]
    return value * (1 + margin) if better(name) == "lower" else value / (1 + margin)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_ratio_is_not_worse_than_recorded(name):
    got, limit = measure_one(name, "quick"), allowed(name)
    worse = got > limit if better(name) == "lower" else got < limit
    assert not worse, (f"{name} = {got:.4g}, worse than the recorded {RECORDED[name]['value']:.4g} "
                       f"beyond its noise margin {RECORDED[name]['margin']:.0%} (limit {limit:.4g}; "
                       f"{better(name)} is better)")


def test_readme_performance_table_is_generated_from_ratios_json():
    from perf_table import README, readme_with_table
    recorded = json.loads((Path(__file__).parent / "ratios.json").read_text())
    text = README.read_text()
    assert readme_with_table(text, recorded) == text, "run: python bench/perf_table.py --write"
