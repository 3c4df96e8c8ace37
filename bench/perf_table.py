"""The README's Performance table, generated from ``bench/ratios.json``.

    python bench/perf_table.py            # print the table
    python bench/perf_table.py --write    # replace it in README.md, between its markers
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
README = HERE.parent / "README.md"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
TARGETS = {"ghost/plain resnet9-bn": "<= 1.10", "ghost/plain resnet9-gn": "<= 1.10",
           "ghost/plain vit": "<= 1.15", "naive/scan resnet9": ">= 10",
           "naive/scan vit": ">= 5", "naive/scan resnet50": ">= 5",
           "op/step tied dropout": "<= 0.02"}


def _fmt(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.2f}"


def table(recorded: dict) -> str:
    rows = ["| ratio | target | full size | quick (CI) | quick, 5 runs | CI margin |",
            "|---|---|---|---|---|---|"]
    for name, quick in recorded["quick"].items():
        full = recorded["full"].get(name)
        runs = quick["runs"]
        rows.append(f"| {name} | {TARGETS.get(name, '-')} | "
                    f"{'-' if full is None else _fmt(full)} | {_fmt(quick['value'])} | "
                    f"{_fmt(min(runs))} to {_fmt(max(runs))} | {quick['margin']:.0%} |")
    return "\n".join(rows)


def readme_with_table(text: str, recorded: dict) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(recorded)}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md's table")
    args = parser.parse_args()
    recorded = json.loads((HERE / "ratios.json").read_text())
    if args.write:
        README.write_text(readme_with_table(README.read_text(), recorded))
    else:
        print(table(recorded))


if __name__ == "__main__":
    main()
