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
from memkern.network.tied_dropout import check_tied_config
from memkern.rundir import json_files

DEFAULT_DROPOUT_SITES: tuple[str, ...] = ()  # empty: the model's own default placement
# Seeds feed torch.Generator.manual_seed, also as seed * 1_000_003 + epoch, which must stay
# below 2**64: 2**32 leaves room for any number of epochs.
MAX_SEED = 2**32 - 1
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
# Upper bounds of the counts a config holds, far above any real run: a config read from a file
# (a received run) with epochs 1e30 would otherwise run until killed.
INT_LIMITS = {"epochs": 100_000, "batch_size": 1 << 20, "world_size": 1 << 16}
MAX_LR = 1e6  # learning rate and weight decay; a diverging lr is the divergence guard's case


def is_plain_file_name(name: str) -> bool:
    """A name that stays in the folder it is joined to: no separator, not ``.``/``..``, not
    hidden, not absolute."""
    return (bool(name) and "/" not in name and "\\" not in name and "\0" not in name
            and not name.startswith("."))


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
    # sgd (the paper's: momentum ``momentum``) or adamw (betas ``(momentum, 0.99)``, decoupled
    # weight decay): the byte GPT learns held-out text far faster with adamw (docs/text.md).
    optimizer: str = "sgd"
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
    # Text runs (dataset text:...; docs/text.md): window length, planted canaries (the i-th
    # repeated canary_reps[i % len] times), duplicated held-out paragraphs, training-text budget
    # in bytes (0: all of the training works).
    seq_len: int = 128
    canaries: int = 0
    canary_reps: tuple[int, ...] = (1, 4, 16, 64, 256)
    dup_paragraphs: int = 0
    dup_reps: int = 16
    text_bytes: int = 0

    @property
    def text(self) -> bool:
        return self.dataset.startswith("text:")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if _kind(f) is float:
                check_finite(f.name, getattr(self, f.name))
        check_seed(self.seed)
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"noise rate must be in [0, 1), got {self.noise}")
        for name, most in INT_LIMITS.items():
            if not 1 <= getattr(self, name) <= most:
                raise ConfigError(f"{name} must be in 1..{most:,}, got {getattr(self, name)}")
        if not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"lr must be positive and at most {MAX_LR:g}, got {self.lr}")
        if not 0 <= self.weight_decay <= MAX_LR:
            raise ConfigError(f"weight_decay must be in [0, {MAX_LR:g}], got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                              f"{self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                              f"{self.lr_schedule!r}")
        if self.train_labels is not None and not is_plain_file_name(self.train_labels):
            raise ConfigError(f"train_labels must name a file in the run directory itself (a "
                              f"plain file name), got {self.train_labels!r}")
        if self.train_labels is not None and self.noise != 0.0:
            raise ConfigError(f"a run with its own training labels ({self.train_labels}) takes "
                              f"no synthetic noise on top: set noise 0, got {self.noise}")
        self._check_text()
        if self.dropout_sites and not self.tied_dropout:
            raise ConfigError(f"dropout sites {', '.join(self.dropout_sites)} are given without "
                              f"tied dropout, where they would do nothing: add --tied-dropout, "
                              f"or drop --sites")
        if self.tied_dropout:  # a tied run is evaluated in every mode; "drop" asks the most
            check_tied_config(p_gen=self.p_gen, p_mem=self.p_mem, mode="drop", seed=self.seed)

    def require_image_run(self, what: str) -> None:
        """ConfigError for a text run, which ``what`` does not analyse yet (docs/text.md)."""
        if self.text:
            raise ConfigError(f"{what} takes image runs; this is a text run ({self.dataset}): "
                              f"train and evaluate it (docs/text.md)")

    def _check_text(self) -> None:
        for name in ("seq_len", "dup_reps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("canaries", "dup_paragraphs", "text_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, got {getattr(self, name)}")
        if not self.canary_reps or any(r < 1 for r in self.canary_reps):
            raise ConfigError(f"canary reps must be positive integers such as 1,4,16,64,256, "
                              f"got {','.join(map(str, self.canary_reps)) or 'none'}")
        # a string test, like the trust check: nothing is built or imported for it
        lm = self.model.partition("?")[0] == "gpt" or self.model.startswith("hf:")
        if self.text and not lm:
            raise ConfigError(f"model {self.model!r} reads images; a text dataset needs --model "
                              f"gpt (sizes as gpt?layers=2&width=64&heads=2&mlp=256) or "
                              f"hf:gpt2[?n_layer=4&n_embd=256...]")
        if lm and not self.text:
            raise ConfigError(f"model {self.model!r} reads text: train it on --dataset "
                              f"text:shakespeare, text:stdlib or text:PATH")
        if self.text:
            if self.noise != 0.0:
                raise ConfigError(f"a text run plants canaries instead of flipping labels: set "
                                  f"noise 0, got {self.noise}")
        elif self.canaries or self.dup_paragraphs:
            raise ConfigError(f"canaries and duplicated paragraphs are planted in text: use "
                              f"--dataset text:shakespeare|text:stdlib|text:PATH, not "
                              f"{self.dataset!r}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TrainConfig":
        """A named preset (see ``PRESETS``) with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "config",
                  check_model: bool = True) -> "TrainConfig":
        """Parse a config written by :meth:`to_json`, checking each field's type and range;
        ``source`` (e.g. the file) starts every error message. A file's text is data: with
        ``check_model`` (for a config that will build its model) the model it names must pass
        :func:`memkern.network.models.trust.check_file_spec`."""
        try:
            data = json_files.loads(text, source=source, error=ConfigError)
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
            config = cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if check_model:
            from memkern.network.models.trust import check_file_spec

            check_file_spec(config.model, source=source)
        return config


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
        item = typing.get_args(typing.get_type_hints(TrainConfig)[f.name])[0]
        if isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool)
                                           for v in value):
            return tuple(value)
        expected = f"a list of {'strings' if item is str else 'integers'}"
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
# A text run without a preset: the byte GPT on 250 KB of Shakespeare with 96 canaries, SGD over
# 12 epochs (0.31M tokens an epoch); held-out text levels off at 3.7 bits per byte from epoch 4
# (docs/text.md, "Training").
TEXT_DEFAULTS = TrainConfig(dataset="text:shakespeare", model="gpt", noise=0.0, batch_size=32,
                            lr=0.3, weight_decay=0.0, warmup=0.05, epochs=12, canaries=96,
                            canary_reps=(1, 4, 16, 64), text_bytes=250_000)

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
    # docs/text.md: the byte GPT on 1.2 MB of Shakespeare with 96 canaries in four reps groups
    # (each copy followed by text in its window), 3 epochs (3.8M tokens) with AdamW: the 64-copy
    # canaries are extracted, the 1-copy ones not, at under 2.2 held-out nats per byte (README,
    # "Language models"). SGD (TEXT_DEFAULTS) diverged on this much text at lr 0.3.
    # With --tied-dropout, 70% of each MLP layer always on: at the paper's p_gen 0.2 the run
    # with its memorization neurons dropped read held-out text 25% worse (per-byte perplexity)
    # than the plain run after these 3 epochs, at 0.5 3.4%, at 0.7 2.2%; no canary was
    # extracted with them dropped at any of the three (README, "Language models").
    "gpt-shakespeare": dataclasses.replace(TEXT_DEFAULTS, optimizer="adamw", lr=0.003,
                                           weight_decay=0.1, epochs=3, text_bytes=1_200_000,
                                           p_gen=0.7),
    # `memkern demo --text`: a 2-layer byte GPT on 20 KB of the standard library's sources with
    # 8 canaries, half planted once and half 128 times. Measured (README, "Language models"):
    # the 128-copy canaries are extracted from epoch 5 on, the 1-copy ones never.
    "gpt-stdlib": TrainConfig(dataset="text:stdlib", model="gpt?layers=2&width=64&heads=2&mlp=256",
                              noise=0.0, batch_size=32, lr=0.3, weight_decay=0.0, warmup=0.05,
                              epochs=14, seq_len=64, canaries=8, canary_reps=(1, 128),
                              text_bytes=20_000),
}
# ... and with example-tied dropout on its MLP neurons (docs/text.md): every copy of a canary
# shares one mask.
PRESETS["gpt-stdlib-tied"] = dataclasses.replace(PRESETS["gpt-stdlib"], tied_dropout=True)


def preset_for(model: str, dataset: str) -> TrainConfig:
    """The preset named ``{model}-{dataset}`` if one exists, else the defaults for them (for a
    text dataset: :data:`TEXT_DEFAULTS`)."""
    preset = PRESETS.get(f"{model}-{dataset}")
    if preset is not None:
        return preset
    if dataset.startswith("text:"):
        return dataclasses.replace(TEXT_DEFAULTS, model=model, dataset=dataset)
    return TrainConfig(model=model, dataset=dataset)


def config_from_options(options: dict, *, preset: str | None = None) -> TrainConfig:
    """A new run's config: ``preset`` (default: the ``{model}-{dataset}`` preset, else the
    defaults) with the fields in ``options`` (``{field: value}``, only those the user set)."""
    _check_fields(options)
    dataset = options.get("dataset", "digits")
    default_model = "gpt" if dataset.startswith("text:") else "cnn"
    base = (TrainConfig.from_name(preset) if preset
            else preset_for(options.get("model", default_model), dataset))
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
