"""memkern: where does a neural network keep what it memorized? (Maini et al., ICML 2023).

The public API, importable from here (see README, "Use from Python", and docs/architecture.md):
the algorithms (models, states and tensors in; arrays or dataclasses out; no files, locks or
progress) and the runners behind the commands (they own a run directory). Names are imported on
first use, so ``import memkern`` (and the CLI, which lives in ``memkern.cli``) loads no more than
it needs.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    # a model, its sites and its data
    "memkern.network.attach": ("attach_sites", "detach_sites"),
    "memkern.network.models": ("build_model", "layer_groups"),
    "memkern.network.tied_dropout": ("attach_tied_dropout", "tied_dropout_mode"),
    "memkern.data": ("PreparedData", "load_dataset", "prepare"),
    "memkern.training.config": ("TrainConfig",),
    "memkern.rundir.context": ("RunContext", "load_trained", "open_run"),
    # the algorithms
    "memkern.training.evaluate": ("mode_accuracies", "predictions", "split_accuracies"),
    "memkern.experiments.gradients.norms": ("per_example_grad_norms",),
    "memkern.experiments.gradients.accounting": ("account_epoch",),
    "memkern.experiments.rewind.algorithm": ("rewind_accuracies", "select_groups",
                                             "with_group_from"),
    "memkern.experiments.retrain.algorithm": ("retrain_group",),
    "memkern.experiments.localize.channels": ("ChannelSpace", "channel_space"),
    "memkern.experiments.localize.objective": ("LocalizationObjective", "reference_indices"),
    "memkern.experiments.localize.greedy": ("Localization", "greedy_localize"),
    "memkern.experiments.localize.reference_cache": ("ReferenceCache",),
    "memkern.experiments.localize.exhaustive": ("exhaustive_localize",),
    "memkern.experiments.localize.exact_argmin": ("bounded_argmin",),
    "memkern.experiments.localize.scan": ("ablation_scan",),
    "memkern.experiments.localize.edited": ("edited_accuracies",),
    "memkern.experiments.localize.weight_edit": ("without_channels",),
    "memkern.experiments.scores.signals": ("channels_to_flip", "combined_score",
                                           "dynamics_signals", "tied_gap"),
    # the runners (one per command)
    "memkern.training.train": ("train",),
    "memkern.training.evaluate_run": ("evaluate_checkpoint",),
    "memkern.experiments.gradients.run": ("gradient_accounting",),
    "memkern.experiments.rewind.run": ("rewind",),
    "memkern.experiments.retrain.run": ("retrain",),
    "memkern.experiments.localize.run": ("localize",),
    "memkern.experiments.scores.run": ("score_run",),
    "memkern.report.page": ("write_report",),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'memkern' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
