"""Training configuration: one dataclass, named presets, validation with typed errors.

A checkpoint carries this config as JSON, so every later command rebuilds the model, the data
split and the label noise from ``--ckpt`` alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

from memkern.errors import ConfigError

DEFAULT_DROPOUT_SITES: tuple[str, ...] = ()  # empty: the model's own default placement
# Seeds feed torch.Generator.manual_seed, also as seed * 1_000_003 + epoch, which must stay
# below 2**64: 2**32 leaves room for any number of epochs.
MAX_SEED = 2**32 - 1
LR_SCHEDULES = ("cosine", "constant")


def check_seed(seed: int, *, name: str = "seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{name} must be in 0..{MAX_SEED}, got {seed}")


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "digits"
    model: str = "cnn"
    norm: str = "batch"
    noise: float = 0.1
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.1  # fraction of all steps with a linear warm-up, then lr_schedule
    lr_schedule: str = "cosine"  # after the warm-up: cosine decay to zero, or constant
    augment: bool = False
    data_dir: str | None = None
    tied_dropout: bool = False
    p_gen: float = 0.2
    p_mem: float = 0.1
    dropout_sites: tuple[str, ...] = field(default=DEFAULT_DROPOUT_SITES)
    # Processes of the launch that started the run (torchrun's WORLD_SIZE), recorded by train;
    # not an option: a world of w trains as one process does, and any world may resume a run.
    world_size: int = 1
    # A run made by `memkern import` from weights trained elsewhere: one checkpoint, no history.
    imported: bool = False
    # The labels the weights were trained with, a file in the run directory (`memkern import
    # --train-labels`); None: the dataset's labels with ``noise`` flipped by ``seed``.
    train_labels: str | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if _kind(f) is float:
                check_finite(f.name, getattr(self, f.name))
        check_seed(self.seed)
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"noise rate must be in [0, 1), got {self.noise}")
        for name in ("epochs", "batch_size", "world_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                              f"{self.lr_schedule!r}")
        if self.train_labels is not None and self.noise != 0.0:
            raise ConfigError(f"a run with its own training labels ({self.train_labels}) takes "
                              f"no synthetic noise on top: set noise 0, got {self.noise}")
        if self.dropout_sites and not self.tied_dropout:
            raise ConfigError(f"dropout sites {', '.join(self.dropout_sites)} are given without "
                              f"tied dropout, where they would do nothing: add --tied-dropout, "
                              f"or drop --sites")
        if self.tied_dropout:
            if not (0.0 < self.p_gen < 1.0 and 0.0 < self.p_mem <= 1.0):
                raise ConfigError(f"need 0 < p_gen < 1 and 0 < p_mem <= 1, got p_gen={self.p_gen}"
                                  f", p_mem={self.p_mem}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TrainConfig":
        """A named preset (see ``PRESETS``) with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "config") -> "TrainConfig":
        """Parse a config written by :meth:`to_json`, checking each field's type; ``source``
        (e.g. the file) starts every error message."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source} is not valid JSON ({e}); restore it") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must hold a JSON object of config fields, found "
                              f"{json.dumps(data)[:40]}; restore it")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ConfigError(f"{source} has unknown fields {sorted(unknown)}: written by a newer "
                              f"memkern? upgrade memkern to read it")
        values = {name: _field_value(fields[name], value, source)
                  for name, value in data.items()}
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _kind(f: dataclasses.Field) -> type:
    """The JSON-level type of a field: str, int, float, bool, (str | None) as str, tuple."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return str
    return typing.get_origin(hint) or hint


def _field_value(f: dataclasses.Field, value, source: str):
    kind = _kind(f)
    optional = f.default is None
    if value is None and optional:
        return None
    if kind is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        expected = "a list of strings"
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif isinstance(value, kind):
        return value
    else:
        expected = {str: "a string", bool: "true or false"}[kind]
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise ConfigError(f"{source}: field {f.name!r} must be {expected}"
                      f"{' or null' if optional else ''}, got {shown}; restore it")


# Paper settings (docs/method.md, "Setup"): SGD lr 0.01 (0.001 on SVHN), batch 512, 50 epochs.
# The digits presets are sized for a laptop CPU: smaller batches give enough steps on 1,437
# examples to memorize the noisy ones within 30 epochs.
PRESETS: dict[str, TrainConfig] = {
    "cnn-digits": TrainConfig(),
    "mlp-digits": TrainConfig(model="mlp"),
    # docs/method.md Experiment 5 on digits: p_gen 0.2 and p_mem 0.1 (the paper's) at the cnn's
    # default sites; noisy examples are memorized with their own masks within 10 epochs and
    # forgotten when their memorization channels are removed (tests/test_tied_training.py).
    "cnn-digits-tied": TrainConfig(tied_dropout=True, epochs=10),
    "cnn-mnist": TrainConfig(dataset="mnist", batch_size=128, lr=0.02, epochs=20),
    "resnet9-mnist": TrainConfig(dataset="mnist", model="resnet9", batch_size=512, lr=0.01,
                                 epochs=50),
    "resnet9-cifar10": TrainConfig(dataset="cifar10", model="resnet9", batch_size=512, lr=0.01,
                                   epochs=50),
    "resnet9-svhn": TrainConfig(dataset="svhn", model="resnet9", batch_size=512, lr=0.001,
                                epochs=50),
}


def preset_for(model: str, dataset: str) -> TrainConfig:
    """The preset named ``{model}-{dataset}`` if one exists, else the defaults for them."""
    preset = PRESETS.get(f"{model}-{dataset}")
    if preset is not None:
        return preset
    return TrainConfig(model=model, dataset=dataset)


def config_from_options(options: dict, *, preset: str | None = None) -> TrainConfig:
    """A new run's config: ``preset`` (default: the ``{model}-{dataset}`` preset, else the
    defaults) with the fields in ``options`` (``{field: value}``, only those the user set)."""
    _check_fields(options)
    base = (TrainConfig.from_name(preset) if preset
            else preset_for(options.get("model", "cnn"), options.get("dataset", "digits")))
    config = dataclasses.replace(base, **options)
    idle = [f"--{k.replace('_', '-')}" for k in ("p_gen", "p_mem") if k in options]
    if idle and not config.tied_dropout:
        raise ConfigError(f"{', '.join(idle)} set without tied dropout, where it does nothing: "
                          f"add --tied-dropout, or drop {', '.join(idle)}")
    return config


def differing_fields(config: TrainConfig, options: dict) -> list[str]:
    """The fields of ``options`` whose values differ from ``config``'s, sorted."""
    _check_fields(options)
    return sorted(k for k, v in options.items() if getattr(config, k) != v)


def _check_fields(options: dict) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; TrainConfig has {sorted(known)}")
