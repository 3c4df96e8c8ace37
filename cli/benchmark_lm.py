"""``memkern benchmark-lm``."""
from __future__ import annotations

import click

from memkern.cli.options import (checkpoint_from, checkpoint_options, device_option,
                                 progress_option, split_names)
from memkern.errors import ConfigError


def _percentages(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--fractions takes comma-separated percentages such as 0.1,0.5,1, "
                          f"got {text!r}") from None


@click.command()
@checkpoint_options("Checkpoint of a text run with canaries")
@click.option("--methods", multiple=True, help="Methods to run (comma-separated or repeated); "
              "default: all of them.")
@click.option("--fractions", default="0.1,0.5,1", show_default=True,
              help="DEL: percentages of each MLP layer's neurons dropped, each in (0, 100].")
@click.option("--limit", type=int, help="DEL on at most N memorized targets.")
@click.option("--inject/--no-inject", default=True, show_default=True,
              help="Also run INJ: fresh canaries planted into 0.1% and 1% of the MLP neurons.")
@click.option("--injections", type=int, default=8, show_default=True,
              help="INJ: fresh canaries planted per fraction.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="JSON-lines output; X.csv, X.md and X.png beside it. "
                   "[default: <run dir>/lm_benchmark.jsonl]")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the clean windows, the methods and the injections.")
@device_option
@progress_option
def benchmark_lm(ckpt, run_dir, methods, fractions, limit, inject, injections, out, seed, device,
                 progress):
    """Localization methods side by side on a text run's memorized texts (DEL, INJ; docs/text.md).

    DEL drops each method's top neurons of every MLP layer for one memorized target and measures
    the target's extraction and exposure, the other canaries and held-out perplexity; INJ plants
    fresh canaries into known neurons and measures each method's recall of them. Resumable:
    a rerun computes only the (method, target) pairs its output lacks. Prints the table beside
    the published numbers of TinyMem and MemPi.

    \b
    Example:
      memkern benchmark-lm --run runs/lm --methods zero_out,random --limit 16
    """
    from memkern.experiments.text.benchmark.run import benchmark_lm as run_benchmark, output_paths

    result = run_benchmark(ckpt=checkpoint_from(ckpt, run_dir), methods=split_names(methods),
                           fractions=_percentages(fractions), limit=limit,
                           inject_canaries=inject, injections=injections, out=out, seed=seed,
                           device=device, progress=progress)
    click.echo(result.markdown)
    table, _, figure = output_paths(result.path)
    click.echo(f"results: {result.path}; table: {table}; figure: {figure}")
