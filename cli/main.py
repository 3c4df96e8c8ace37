"""The ``memkern`` command group. Commands are thin: parse options, call one library function.

Bad input raises a :class:`memkern.errors.MemkernError`; here it becomes one line on stderr and
exit code 2, with no traceback. An OSError that no library code turned into a typed error
(permissions, a full disk, a vanished folder) gets the same treatment, as a last resort.
"""
from __future__ import annotations

import importlib
import os
import sys

import click
from click.formatting import HelpFormatter

from memkern.cli.allocator import keep_freed_memory
from memkern.errors import MemkernError, os_error_message, printable
from memkern.kernels.errors import ChannelMaskError

# Commands that split their work over the processes torchrun starts; the others refuse a world
# larger than one instead of racing on the same files.
SHARDED = ("train", "grads", "localize")
# How each command continues after Ctrl-C (the others have nothing to continue).
_CONTINUE = {"train": "rerun with --resume to continue",
             **{c: "rerun the same command to continue" for c in
                ("grads", "retrain", "localize", "demo", "benchmark-lm")}}


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


# name: (module under memkern.cli, the command's short help). Each command's module (and with
# it torch) is imported only when that command runs or prints its own help, so `memkern
# --help` stays fast; tests/test_cli_misc.py checks these texts against the commands' own.
COMMANDS = {
    "train": ("train", "Train a model with label noise, checkpointing every epoch into a run "
                       "directory."),
    "import": ("import_weights", "Turn weights trained outside memkern into a run directory "
                                 "for evaluate, grads, localize and scores (rewind and retrain "
                                 "need memkern's own training history)."),
    "evaluate": ("evaluate", "Clean-train, noisy-train and test accuracy of a checkpoint, "
                             "written to <run>/evaluate_<epoch>_<mode>.json."),
    "grads": ("grads", "Per-example, per-layer gradient norms and clean/noisy gradient "
                       "accounting of a run."),
    "rewind": ("rewind", "Rewind each layer group (weights and BatchNorm statistics) of a run's "
                         "final model to earlier checkpoints; write rewind.csv and rewind.png "
                         "into the run directory."),
    "retrain": ("retrain", "Reset one layer group at a time to an early checkpoint, freeze the "
                           "rest, fine-tune the group on clean examples only; write retrain.csv "
                           "and retrain.png into the run directory."),
    "localize": ("localize", "Find the channels whose zeroing flips each example's prediction "
                             "(docs/method.md, Experiment 4)."),
    "scores": ("scores", "Which training examples did the model memorize? Every per-example "
                         "signal side by side."),
    "report": ("report", "Write RUN/report/index.html: one self-contained page (figures "
                         "embedded) with the findings of every analysis the run holds, in words, "
                         "figures and tables."),
    "demo": ("demo", "Run every experiment on the embedded digits data (minutes on a laptop "
                     "CPU; rerun the same command to resume: finished steps are not computed "
                     "again)."),
    "benchmark-lm": ("benchmark_lm", "Localization methods side by side on a text run's "
                                     "memorized texts (DEL, INJ; docs/text.md)."),
    "sites": ("sites", "List a model's channel sites (stable order) and layer groups."),
    "env": ("env", "Print versions, devices and the Triton status."),
}


class MemkernGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        if name not in self.commands:
            module = importlib.import_module(f"memkern.cli.{COMMANDS[name][0]}")
            command = getattr(module, COMMANDS[name][0])
            _refuse_empty_paths(command)
            self.add_command(command, name)
        return self.commands[name]

    def format_commands(self, ctx: click.Context, formatter: HelpFormatter) -> None:
        """The command list from :data:`COMMANDS`, without importing any command."""
        width = formatter.width - 6 - max(map(len, COMMANDS))
        rows = [(name, click.utils.make_default_short_help(COMMANDS[name][1], width))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

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
        except BrokenPipeError:  # the reader stopped (``| head``): nothing went wrong here
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
            sys.exit(141)  # as a shell reports a process ended by SIGPIPE
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


def _refuse_empty_paths(command: click.Command) -> None:
    """An empty path option (``--out ''``) is refused: it would mean the current directory."""
    for param in command.params:
        if isinstance(param, click.Option) and isinstance(param.type, click.Path):
            def check(ctx, p, value, inner=param.callback):
                if any(v == "" for v in (value if isinstance(value, tuple) else (value,))):
                    raise click.BadParameter("the value is empty (''); pass a path", ctx, p)
                return inner(ctx, p, value) if inner else value
            param.callback = check
