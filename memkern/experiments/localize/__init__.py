"""Neuron-level localization (docs/method.md, Experiment 4): greedy (first-order, many targets at
once) and exhaustive (exact: an argmin pruned by a bound, candidates batched), per-example
results and their summary."""
from memkern.experiments.localize.exact_argmin import BoundedArgmin, bounded_argmin
from memkern.experiments.localize.channels import ChannelSpace, channel_space
from memkern.experiments.localize.exhaustive import exhaustive_localize
from memkern.experiments.localize.greedy import Localization, greedy_localize
from memkern.experiments.localize.objective import LocalizationObjective, reference_indices
from memkern.experiments.localize.reference_cache import ReferenceCache
from memkern.experiments.localize.run import LocalizeResult, localize
from memkern.experiments.localize.scan import ablation_scan, naive_ablation_scan
from memkern.experiments.localize.summary import format_table, summarize, write_summary

__all__ = ["BoundedArgmin", "ChannelSpace", "LocalizationObjective", "Localization",
           "LocalizeResult", "ReferenceCache", "ablation_scan", "bounded_argmin",
           "channel_space", "exhaustive_localize", "format_table", "greedy_localize",
           "localize", "naive_ablation_scan", "reference_indices", "summarize",
           "write_summary"]
