"""Options shared by several commands, defined once."""
from __future__ import annotations

from pathlib import Path

import click

from memkern.data import DATASETS, USER_DATASETS, user_dataset_path
from memkern.data.text import PREFIX as TEXT_PREFIX
from memkern.data.text.corpus import BUILTIN_CORPORA
from memkern.errors import ConfigError
from memkern.rundir.context import DEVICES
from memkern.rundir.paths import RunDir


class DatasetSpec(click.ParamType):
    """A dataset name, or ``folder:PATH`` / ``npz:PATH`` with PATH made absolute, so the run's
    config rebuilds the data from any working directory."""

    name = "dataset"

    def convert(self, value, param, ctx):
        if value.startswith(TEXT_PREFIX):
            source = value[len(TEXT_PREFIX):]
            if source in BUILTIN_CORPORA:
                return value
            if not source:
                self.fail("text: names no corpus; pass text:shakespeare, text:stdlib or "
                          "text:PATH", param, ctx)
            return f"{TEXT_PREFIX}{Path(source).expanduser().resolve()}"
        user = user_dataset_path(value)
        if user is not None:
            kind, path = user
            return f"{kind}:{Path(path).expanduser().resolve()}"
        if value not in DATASETS:
            self.fail(f"{value!r} is not one of {', '.join(DATASETS)}, nor "
                      f"{' / '.join(k + ':PATH' for k in USER_DATASETS)}", param, ctx)
        return value

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(DATASETS) + "|folder:PATH|npz:FILE|text:CORPUS]"


DATASET_HELP = ("A built-in dataset, folder:PATH (PATH/train/<class>/*.png|jpg and "
                "PATH/test/<class>/...), npz:FILE (arrays x_train, y_train, x_test, y_test), "
                "or text: text:shakespeare, text:stdlib, text:PATH (UTF-8 .txt file or folder).")

device_option = click.option("--device", type=click.Choice(DEVICES),
                             default="auto", show_default=True,
                             help="auto: CUDA when available, else CPU.")
data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False),
                               help="Directory with the dataset's standard files "
                                    "(not needed for digits); overrides the checkpoint's.")


progress_option = click.option("--progress/--no-progress", default=True, show_default=True)


def run_option(help: str = "Run directory written by `memkern train`.", *,
               required: bool = True, aliases: tuple[str, ...] = ()):
    """``--run DIR`` (and ``aliases``), passed to the command as ``run_dir``."""
    return click.option("--run", *aliases, "run_dir", required=required,
                        type=click.Path(file_okay=False), help=help)


def _trust_model_code(ctx, param, value: bool) -> None:
    """Click callback: honour the factory a run's files name, for this command only."""
    from memkern.network.models.trust import allow_model_code

    if value:
        allow_model_code(True)
        ctx.call_on_close(lambda: allow_model_code(False))


trust_model_code_option = click.option(
    "--trust-model-code", is_flag=True, expose_value=False, callback=_trust_model_code,
    help="Build the model a run's config names even when it is a package.module:factory "
         "(imports and runs that code); only for runs you trust. See README, 'Safety'.")


def checkpoint_options(what: str):
    """``--ckpt PATH`` or ``--run DIR`` (that run's final checkpoint), exactly one of them; the
    command gets ``ckpt`` and ``run_dir`` and passes them to :func:`checkpoint_from`. With
    ``--trust-model-code`` last among the options."""
    def decorate(command):
        command = trust_model_code_option(command)
        command = run_option("Run directory: use its final checkpoint.", required=False)(command)
        return click.option("--ckpt", type=click.Path(dir_okay=False),
                            help=f"{what}; or give --run.")(command)
    return decorate


def checkpoint_from(ckpt: str | None, run_dir: str | None) -> Path:
    """The checkpoint named by ``--ckpt``, or the final one of ``--run``."""
    if (ckpt is None) == (run_dir is None):
        raise ConfigError(f"give {'only one of' if ckpt else 'one of'} --ckpt (a checkpoint) and "
                          f"--run (a run directory: its final checkpoint)")
    return Path(ckpt) if ckpt is not None else RunDir(run_dir).final_checkpoint()


def parse_epochs(text: str | None, *, option: str = "--epochs") -> list[int] | None:
    """``"0,10,20"`` -> ``[0, 10, 20]``; None or empty -> None (the command's default)."""
    if not text:
        return None
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers such as 0,10,20, got {text!r}")


def split_names(values: tuple[str, ...]) -> list[str]:
    """Repeated and/or comma-separated option values, flattened."""
    return [n for v in values for n in v.split(",") if n]


def model_name(ctx, param, value: str) -> str:
    """Click callback: one of memkern's models, or a spec (built, and checked, when used)."""
    from memkern.network.models import MODELS, is_gpt

    if value in MODELS or ":" in value or is_gpt(value):
        return value
    raise click.BadParameter(f"{value!r} is neither one of {', '.join(sorted(MODELS))} nor a "
                             f"spec such as torchvision:resnet18")


MODEL_HELP = ("cnn, mlp, resnet9, resnet50, vit; gpt[?layers=4&width=256&heads=4&mlp=1024] "
              "or hf:gpt2[?n_layer=4&n_embd=256&n_head=4...] (transformers) for text; or "
              "torchvision:NAME, timm:NAME[?key=value&...] "
              "(e.g. timm:vit_tiny_patch16_224?img_size=32&patch_size=4), package.module:factory "
              "(called with num_classes, in_channels, image_size). See README, 'Your own model'.")
model_option = click.option("--model", default="cnn", show_default=True, callback=model_name,
                            help=MODEL_HELP)


def parse_reps(text: str) -> tuple[int, ...]:
    """``"1,4,16"`` -> ``(1, 4, 16)``; ConfigError unless every part is a positive integer."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--canary-reps takes positive integers such as 1,4,16,64,256, got "
                          f"{text!r}")
    return tuple(int(p) for p in parts)
