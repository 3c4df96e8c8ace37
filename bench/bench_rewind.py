"""Rewind evaluation: functional_call over one model (memkern's path) vs torch.func.vmap over
stacked state dicts vs a deep copy per configuration, side by side in one group."""
import copy

import pytest
import torch
from torch.func import functional_call, vmap

from memkern.training.config import TrainConfig
from memkern.training.evaluate import split_accuracies
from memkern.rundir.context import load_data, model_for
from memkern.network.models import layer_groups
from memkern.experiments.rewind.algorithm import with_group_from


MEDIANS: dict[str, float] = {}  # method -> median seconds, for ratios to functional_call


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = TrainConfig()
    data = load_data(config)
    model = model_for(config, data).eval()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    early = {k: (v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v)
             for k, v in final.items()}
    states = [with_group_from(final, early, [g]) for g in layer_groups(model)]
    return model, data, states


def _functional(model, data, states):
    return [split_accuracies(model, data, state=s) for s in states]


def _deep_copy(model, data, states):
    out = []
    for s in states:
        twin = copy.deepcopy(model)
        twin.load_state_dict(s)
        out.append(split_accuracies(twin, data))
    return out


def _accuracies(predictions: torch.Tensor, data) -> list[dict]:
    """``[configs, train + test]`` predictions -> the accuracies :func:`split_accuracies` gives."""
    n = len(data.train_labels)
    out = []
    for pred in predictions:
        train, test = pred[:n] == data.train_labels, pred[n:] == data.test_labels
        out.append({"clean_acc": float(train[~data.noisy_mask].float().mean()),
                    "noisy_acc": float(train[data.noisy_mask].float().mean()),
                    "test_acc": float(test.float().mean())})
    return out


@torch.no_grad()
def _vmap(model, data, states):
    x = torch.cat([data.train_images, data.test_images])
    stacked = {n: torch.stack([s[n] for s in states]) for n in states[0]}
    return vmap(lambda p: functional_call(model, p, (x,)))(stacked).argmax(-1)


@pytest.mark.parametrize("method", ["functional_call", "vmap", "deep_copy"])
def test_rewind_evaluation(benchmark, setup, method, context_info, quick):
    model, data, states = setup
    if quick:
        states = states[:2]
    run = {"functional_call": _functional, "vmap": _vmap, "deep_copy": _deep_copy}[method]
    # Every method first proves it computes the deep copy's accuracies (the obvious reference).
    got = run(model, data, states)
    got = _accuracies(got, data) if method == "vmap" else got
    want = _deep_copy(model, data, states)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-6), (method, g, w)
    benchmark.group = "rewind-evaluation"
    benchmark.extra_info.update(context_info, configurations=len(states),
                                examples=len(data.train_labels) + len(data.test_labels))
    benchmark.pedantic(run, args=(model, data, states), rounds=1 if quick else 3,
                       warmup_rounds=1)
    MEDIANS[method] = benchmark.stats.stats.median
    if "functional_call" in MEDIANS:
        benchmark.extra_info["seconds_over_functional_call"] = (
            MEDIANS[method] / MEDIANS["functional_call"])
