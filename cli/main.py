"""The ``memkern`` command group. Commands are thin: parse options, call one library function.

Bad input raises a :class:`memkern.errors.MemkernError`; here it becomes one line on stderr and
exit code 2, with no traceback. An OSError that no library code turned into a typed error
(permissions, a full disk, a vanished folder) gets the same treatment, as a last resort.
"""
from __future__ import annotations

import sys

import click

from memkern.cli.allocator import keep_freed_memory
from memkern.errors import MemkernError, os_error_message, printable
from memkern.kernels.errors import ChannelMaskError

# Commands that split their work over the processes torchrun starts; the others refuse a world
# larger than one instead of racing on the same files.
SHARDED = ("train", "grads", "localize")
# How each command continues after Ctrl-C (the others have nothing to continue).
_CONTINUE = {"train": "rerun with --resume to continue",
             **{c: "rerun the same command to continue" for c in
                ("grads", "retrain", "localize", "demo")}}


def _fail(message: str) -> None:
    """One ``memkern: error:`` line (paths that are not UTF-8 shown with escapes), exit 2."""
    click.echo(f"memkern: error: {printable(' '.join(message.splitlines()))}", err=True)
    sys.exit(2)


def _refuse_world(command: str) -> None:
    """One line (from rank 0 alone) and exit 2 when a one-process command runs under torchrun."""
    from memkern.training.distributed import World

    world = World.from_env()
    if world.size == 1 or command in SHARDED:
        return
    if world.main:
        click.echo(f"memkern: error: `memkern {command}` runs in one process, not in a world of "
                   f"{world.size} (WORLD_SIZE={world.size}): run it without torchrun; under "
                   f"torchrun, {', '.join(SHARDED)} split their work over the ranks", err=True)
    sys.exit(2)


class MemkernGroup(click.Group):
    def resolve_command(self, ctx: click.Context, args):
        name, command, rest = super().resolve_command(ctx, args)
        _refuse_world(name)
        return name, command, rest

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # one line instead of click's usage block
            where = f"memkern {e.ctx.info_name}" if e.ctx and e.ctx.parent else "memkern"
            _fail(f"{e.format_message()} (see `{where} --help`)")
        except (MemkernError, ChannelMaskError) as e:
            _fail(str(e))
        except OSError as e:
            _fail(os_error_message(e))
        except KeyboardInterrupt:
            how = _CONTINUE.get(ctx.invoked_subcommand or "")
            click.echo("memkern: interrupted; " + (f"completed work is saved: {how}" if how else
                                                   "nothing was left half-written"), err=True)
            sys.exit(130)


@click.group(cls=MemkernGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memkern")
def main() -> None:
    """memkern: find where a neural network keeps what it memorized.

    \b
    Example:
      memkern train --dataset digits --model cnn --noise 0.1 --epochs 30 --out runs/digits
    """
    keep_freed_memory()  # large CPU activations reused, not re-mapped each step


def _register() -> None:
    from memkern.cli.env import env
    from memkern.cli.demo import demo
    from memkern.cli.evaluate import evaluate
    from memkern.cli.grads import grads
    from memkern.cli.import_weights import import_weights
    from memkern.cli.localize import localize
    from memkern.cli.report import report
    from memkern.cli.retrain import retrain
    from memkern.cli.rewind import rewind
    from memkern.cli.scores import scores
    from memkern.cli.sites import sites
    from memkern.cli.train import train

    for command in (train, import_weights, evaluate, grads, rewind, retrain, localize, scores,
                    report, demo, sites, env):
        _refuse_empty_paths(command)
        main.add_command(command)


def _refuse_empty_paths(command: click.Command) -> None:
    """An empty path option (``--out ''``) is refused: it would mean the current directory."""
    for param in command.params:
        if isinstance(param, click.Option) and isinstance(param.type, click.Path):
            def check(ctx, p, value, inner=param.callback):
                if any(v == "" for v in (value if isinstance(value, tuple) else (value,))):
                    raise click.BadParameter("the value is empty (''); pass a path", ctx, p)
                return inner(ctx, p, value) if inner else value
            param.callback = check


_register()
