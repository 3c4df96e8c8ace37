"""The ``memkern`` command group. Commands are thin: parse options, call one library function.

Bad input raises a :class:`memkern.errors.MemkernError`; here it becomes one line on stderr and
exit code 2, with no traceback.
"""
from __future__ import annotations

import sys

import click

from memkern.errors import MemkernError
from memkern.kernels.errors import ChannelMaskError


class MemkernGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # one line instead of click's usage block
            where = f"memkern {e.ctx.info_name}" if e.ctx and e.ctx.parent else "memkern"
            click.echo(f"memkern: error: {e.format_message()} (see `{where} --help`)", err=True)
            sys.exit(2)
        except (MemkernError, ChannelMaskError) as e:
            click.echo(f"memkern: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("memkern: interrupted (completed work is saved; rerun with --resume "
                       "where the command has it)", err=True)
            sys.exit(130)


@click.group(cls=MemkernGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memkern")
def main() -> None:
    """memkern: find where a neural network keeps what it memorized.

    \b
    Example:
      memkern train --dataset digits --model cnn --noise 0.1 --epochs 30 --out runs/digits
    """


def _register() -> None:
    from memkern.cli.env import env
    from memkern.cli.demo import demo
    from memkern.cli.evaluate import evaluate
    from memkern.cli.grads import grads
    from memkern.cli.localize import localize
    from memkern.cli.report import report
    from memkern.cli.retrain import retrain
    from memkern.cli.rewind import rewind
    from memkern.cli.scores import scores
    from memkern.cli.sites import sites
    from memkern.cli.train import train

    for command in (train, evaluate, grads, rewind, retrain, localize, scores, report, demo, sites,
                    env):
        main.add_command(command)


_register()
