"""Per-example memorization signals, and what "suspicious" means for each.

The dynamics signals take the arrays of :class:`memkern.training.dynamics.Dynamics` (``[E, N]``,
epoch rows ascending); :func:`tied_gap` takes a tied-dropout model and its data;
:func:`channels_to_flip` takes localization results. Each returns float64 ``[N]`` in the
signal's natural unit (the gradient-norm signal is
:func:`memkern.experiments.gradients.accounting.account_epoch`'s per-example norms). No files. ``DIRECTION`` says which way
points at memorized / mislabeled examples (+1: high values, -1: low values);
:func:`oriented` turns any signal into "higher = more suspicious". See docs/scores.md.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch

from memkern.data import PreparedData
from memkern.network.tied_dropout import tied_dropout_mode
from memkern.training.dynamics import example_stats
from memkern.training.evaluate import predictions

# +1: a high value marks a memorized / mislabeled example; -1: a low value does.
DIRECTION = {
    "aum": -1,                # area under the margin (Pleiss et al. 2020): negative when the
                              # trained label keeps losing to another class
    "forgetting_events": +1,  # correct -> wrong transitions (Toneva et al. 2019)
    "learned_epoch": +1,      # first epoch from which the example stays correct; inf: never
    "confidence": -1,         # dataset cartography (Swayamdipta et al. 2020): mean p(label)
    "variability": +1,        # cartography: std of p(label) over epochs
    "final_loss": +1,         # cross-entropy at the last epoch
    "grad": +1,               # per-example gradient norm (GraNd, Paul et al. 2021): grad_*
    "channels_to_flip": -1,   # channels zeroed to flip the prediction (localize); inf: not flipped
    "tied_gap": +1,           # tied dropout: own-mask margin minus keep-mode margin
    "memorization_score": +1,  # the combined score (:func:`combined_score`)
}

# The signals the combined score averages over, when present for every example; the table adds
# the total gradient norm at the earliest and the final epoch with per-example norms. Variability
# is left out (its direction depends on how far training went), as are the per-group gradient
# norms (the total stands for them) and localization (it covers only the examples it ran on).
COMBINED = ("aum", "forgetting_events", "learned_epoch", "confidence", "final_loss", "tied_gap")


def direction(name: str, directions: Mapping[str, int] | None = None) -> int:
    """The direction of a score column (``grad_<group>_eNNN`` columns are gradient norms), in
    ``directions`` (default: an image run's, :data:`DIRECTION`)."""
    return (directions or DIRECTION)["grad" if name.startswith("grad_") else name]


def aum(margin: torch.Tensor) -> np.ndarray:
    """Mean over epochs of (trained-label logit minus the largest other logit)."""
    return margin.double().mean(0).numpy()


def forgetting_events(correct: torch.Tensor) -> np.ndarray:
    """How often an example goes from correct at one epoch to wrong at the next."""
    return (correct[:-1] & ~correct[1:]).sum(0).double().numpy()


def learned_epoch(correct: torch.Tensor, epochs: torch.Tensor) -> np.ndarray:
    """The first epoch from which the example is correct through the last epoch; inf when it is
    wrong at the last epoch."""
    trailing = correct.flip(0).long().cumprod(0).sum(0)  # consecutive correct epochs at the end
    first = len(epochs) - trailing
    out = epochs.double()[first.clamp(max=len(epochs) - 1)].numpy()
    out[(trailing == 0).numpy()] = np.inf
    return out


def label_probability(loss: torch.Tensor) -> torch.Tensor:
    """p(trained label) = exp(-cross-entropy), float64 ``[E, N]``."""
    return torch.exp(-loss.double())


def confidence(loss: torch.Tensor) -> np.ndarray:
    return label_probability(loss).mean(0).numpy()


def variability(loss: torch.Tensor) -> np.ndarray:
    """Population standard deviation over epochs of p(trained label)."""
    return label_probability(loss).std(0, correction=0).numpy()


def final_loss(loss: torch.Tensor) -> np.ndarray:
    return loss[-1].double().numpy()


DYNAMICS_SIGNALS = ("aum", "forgetting_events", "learned_epoch", "confidence", "variability",
                    "final_loss")


def dynamics_signals(dynamics) -> dict[str, np.ndarray]:
    """Every signal of one :class:`memkern.training.dynamics.Dynamics`, by column name."""
    return {"aum": aum(dynamics.margin),
            "forgetting_events": forgetting_events(dynamics.correct),
            "learned_epoch": learned_epoch(dynamics.correct, dynamics.epochs),
            "confidence": confidence(dynamics.loss),
            "variability": variability(dynamics.loss),
            "final_loss": final_loss(dynamics.loss)}


def channels_to_flip(results: Iterable[Mapping], num_train: int) -> np.ndarray:
    """Channels zeroed to flip each localized example (inf: not flipped); NaN elsewhere.
    ``results``: localization lines (``index``, ``n_channels``, ``flipped``), as
    ``memkern localize`` writes them."""
    out = np.full(num_train, np.nan)
    for row in results:
        out[row["index"]] = row["n_channels"] if row["flipped"] else np.inf
    return out


def tied_gap(model: torch.nn.Module, data: PreparedData) -> np.ndarray:
    """Margin of each training example with its own tied-dropout mask minus its margin in mode
    "keep" (every example's memorization channels scaled by p_mem); ``data``'s training rows
    carry their position as dataset index."""
    index = torch.arange(len(data.train_labels))
    margins = {}
    for mode in ("own", "keep"):
        chunks = []
        with tied_dropout_mode(model, mode):
            predictions(model, data.train_images, indices=index,
                        on_logits=lambda logits: chunks.append(logits.float().cpu()))
        margins[mode] = example_stats(torch.cat(chunks), data.train_labels)["margin"]
    return (margins["own"] - margins["keep"]).double().numpy()


def oriented(name: str, values: np.ndarray, directions: Mapping[str, int] | None = None
             ) -> np.ndarray:
    """``values`` of column ``name`` flipped where needed so that higher = more suspicious
    (``directions``: another run kind's, such as a text run's; default the image one)."""
    return direction(name, directions) * np.asarray(values, dtype=np.float64)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to (0, 1]: 1 for the highest value."""
    from scipy.stats import rankdata
    return rankdata(values) / len(values)


def combined_score(columns: dict[str, np.ndarray], names: list[str],
                   directions: Mapping[str, int] | None = None) -> np.ndarray:
    """Mean percentile rank of the signals ``names`` (each oriented so higher = more
    suspicious, by ``directions`` when given), float64 ``[N]`` in (0, 1]."""
    return np.mean([percentile_ranks(oriented(name, columns[name], directions))
                    for name in names], axis=0)
