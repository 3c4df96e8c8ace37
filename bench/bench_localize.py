"""Localization benchmarks (CPU), each peer measured side by side in one run.

(a) single-channel ablation scan of every pre-norm channel of ResNet-9 (1,344 channels, BN in
    eval mode, one 32x32x3 example): naive loop of full forwards, captum LayerFeatureAblation
    (64 perturbations per forward), memkern's batched scan. Quick mode: two late sites, 12x12.
    The same scan on the ViT's token sites (every MLP hidden unit, 1,024 channels) and on
    ResNet-50 (64 channels of each of five sites from the stem to the last expand conv, where
    a full scan's naive loop would take hours), each against the naive loop.
(b) greedy localization on a trained digits cnn (10% noise): targets per second, all targets
    batched vs the same code one target at a time (same results, tests/test_localize.py) vs
    the paper's loop (model copy per target, weight gradients, w * dL/dw filter scores);
    32 targets (16 noisy, 16 clean), 512 references, cap 50 channels.
(c) one greedy pass at 129 to 4,128 rows: rows per second, i.e. how much of the CPU one
    target's pass already uses.
(d) greedy as the runner calls it, in chunks of 32 targets, on 32 and 288 targets of the same
    run: every chunk runs its own reference passes vs the chunks sharing one ReferenceCache
    (same lines, asserted before timing and again on the timed results).
(e) one exhaustive step (the argmin over all 480 channels of the same digits cnn, 512
    references) for 6 noisy targets (2 in quick mode): a full forward of the target and its
    references per channel (naive loop), the full scan, and the bounded argmin (the target's
    own rows bound every channel; only channels the bound leaves in get the references); the
    same channel asserted first for every target.
Peak memory: the process's resident high-water mark after each method (ru_maxrss), so only
increases are attributable to the method run last.
"""
import resource
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, rounds
from fixture_models import eval_model
from memkern.training.config import TrainConfig
from memkern.rundir.context import load_trained
from memkern.experiments.localize import (LocalizationObjective, ablation_scan, channel_space,
                              greedy_localize, naive_ablation_scan, reference_indices)
from memkern.experiments.localize.exact_argmin import bounded_argmin
from memkern.experiments.localize.channels import row_masks, set_masks
from memkern.experiments.localize.examples import select_examples
from memkern.experiments.localize.greedy import frozen
from memkern.experiments.localize.paper_loop import paper_localize
from memkern.experiments.localize.reference_cache import ReferenceCache
from memkern.training.train import train
from memkern.network.sites import channel_sites

_TIMES: dict[str, dict[str, float]] = {}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _record(benchmark, group: str, name: str, info: dict, work: int, unit: str) -> None:
    mean = benchmark.stats.stats.mean
    _TIMES.setdefault(group, {})[name] = mean
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({"peak_rss_mib": _peak_mib(), f"{unit}_per_s": work / mean})
    for other, t in _TIMES[group].items():
        if other != name:
            benchmark.extra_info[f"speedup_vs_{other}"] = t / mean


@pytest.fixture(scope="module")
def resnet9_case():
    size = 12 if QUICK else 32
    model = eval_model("resnet9", image_size=size)
    sites = ["res2.body.1.pre", "conv4.pre"] if QUICK else None
    space = channel_space(model, sites)
    x = torch.randn(1, 3, size, size)
    y = torch.tensor([3])
    return model, space, x, y


def _scan_info(context_info, space, x):
    return {**context_info, "channels": space.total, "input": list(x.shape), "dtype": "float32"}


def test_scan_naive(benchmark, resnet9_case, context_info):
    model, space, x, y = resnet9_case
    benchmark.group = "ablation-scan-resnet9"
    _scan_error(model, x, y, space, torch.randperm(space.total)[:16])
    with torch.no_grad():
        benchmark.pedantic(naive_ablation_scan, args=(model, x, y), kwargs={"sites": space},
                           rounds=rounds(2), warmup_rounds=1 if rounds(2) > 1 else 0)
    _record(benchmark, "scan", "naive", _scan_info(context_info, space, x), space.total, "channels")


def test_scan_captum(benchmark, resnet9_case, context_info):
    captum = pytest.importorskip("captum.attr")
    model, space, x, y = resnet9_case
    benchmark.group = "ablation-scan-resnet9"
    sites = channel_sites(model)
    modules = dict(model.named_modules())
    # the pre-norm activation is the output of the conv just before the site
    convs = {s: modules[s.rpartition(".")[0] + (".conv" if s.endswith(".pre") else "")]
             for s in space.names}

    def forward(inp):
        return F.log_softmax(model(inp), dim=1)

    def scan(names=space.names):
        with torch.no_grad():
            return [captum.LayerFeatureAblation(forward, convs[s]).attribute(
                        x, target=y, layer_mask=torch.arange(sites[s].channels).view(1, -1, 1, 1),
                        perturbations_per_eval=64).amax((0, 2, 3)) for s in names]

    # Before timing: captum's attribution of a channel is log p_y(x) - log p_y(x, channel off),
    # i.e. memkern's scan value (the cross-entropy with the channel off) minus the unablated one.
    last = space.names[-1]
    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
        ours = ablation_scan(model, x, y, sites=space).values
    offset = space.offsets[-1]
    want = ours[offset:offset + space.counts[-1]] - base
    err = float((scan([last])[0].double() - want).abs().max())
    assert err <= 1e-4, f"captum differs from memkern's scan by {err} at {last}"
    benchmark.pedantic(scan, rounds=rounds(2), warmup_rounds=1 if rounds(2) > 1 else 0)
    _record(benchmark, "scan", "captum", _scan_info(context_info, space, x), space.total, "channels")


def test_scan_memkern(benchmark, resnet9_case, context_info):
    model, space, x, y = resnet9_case
    benchmark.group = "ablation-scan-resnet9"
    sample = torch.randperm(space.total)[:16]
    err = _scan_error(model, x, y, space, sample)
    got = benchmark.pedantic(ablation_scan, args=(model, x, y), kwargs={"sites": space},
                             rounds=rounds(3), warmup_rounds=1 if rounds(3) > 1 else 0)
    benchmark.extra_info.update({"max_abs_err_vs_naive": err, "path": got.path})
    _record(benchmark, "scan", "memkern", _scan_info(context_info, space, x), space.total,
            "channels")


def _scan_error(model, x, y, space, cand) -> float:
    """The scan against the naive loop on ``cand``: asserted equal before anything is timed."""
    got = ablation_scan(model, x, y, sites=space, candidates=cand).values[cand]
    want = naive_ablation_scan(model, x, y, sites=space, candidates=cand)[cand]
    err = float((got - want).abs().max())
    assert err <= 1e-4, f"scan differs from the naive loop by {err}"
    return err


# model: (image side full/quick, sites full/quick, channels per site full/quick; None = all)
SCAN_MODELS = {
    "vit": ((32, 8), (None, ["blocks.0.hidden", "blocks.3.hidden"]), (None, 8)),
    "resnet50": ((32, 8), (["stem.pre", "stage1.0.expand_site", "stage2.3.expand_site",
                            "stage3.5.expand_site", "stage4.2.expand_site"],
                           ["stage1.2.expand_site", "stage4.2.expand_site"]), (64, 8)),
}


@pytest.fixture(scope="module", params=list(SCAN_MODELS))
def scan_case(request):
    name = request.param
    side, site_lists, per_site = (v[1] if QUICK else v[0] for v in SCAN_MODELS[name])
    model = eval_model(name, image_size=side)
    space = channel_space(model, site_lists or [n for n in channel_sites(model) if "hidden" in n])
    cand = torch.cat([off + torch.randperm(count)[:per_site or count]
                      for off, count in zip(space.offsets, space.counts)])
    return name, model, space, torch.randn(1, 3, side, side), torch.tensor([3]), cand


def _model_scan_info(context_info, name, space, x, cand):
    return {**context_info, "model": name, "sites": list(space.names), "channels": len(cand),
            "input": list(x.shape), "dtype": "float32"}


def test_scan_model_naive(benchmark, scan_case, context_info):
    name, model, space, x, y, cand = scan_case
    benchmark.group = f"ablation-scan-{name}"
    _scan_error(model, x, y, space, cand[torch.randperm(len(cand))[:16]])
    benchmark.pedantic(naive_ablation_scan, args=(model, x, y),
                       kwargs={"sites": space, "candidates": cand}, rounds=1, warmup_rounds=0)
    _record(benchmark, f"scan-{name}", "naive",
            _model_scan_info(context_info, name, space, x, cand), len(cand), "channels")


def test_scan_model_memkern(benchmark, scan_case, context_info):
    name, model, space, x, y, cand = scan_case
    benchmark.group = f"ablation-scan-{name}"
    err = _scan_error(model, x, y, space, cand[torch.randperm(len(cand))[:16]])
    got = benchmark.pedantic(ablation_scan, args=(model, x, y),
                             kwargs={"sites": space, "candidates": cand}, rounds=rounds(3),
                             warmup_rounds=1 if rounds(3) > 1 else 0)
    benchmark.extra_info.update({"max_abs_err_vs_naive": err, "path": got.path})
    _record(benchmark, f"scan-{name}", "memkern",
            _model_scan_info(context_info, name, space, x, cand), len(cand), "channels")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A real digits run (cnn, 10% noise, 30 epochs; 3 in quick mode), the paper's reference
    batch of 512 (16 in quick mode), cap 50 channels (3)."""
    out = tmp_path_factory.mktemp("greedy") / "run"
    epochs = 3 if QUICK else 30
    train(TrainConfig(epochs=epochs), out=out, progress=False, device="cpu")
    trained = load_trained(out / "checkpoints" / f"epoch_{epochs:03d}.safetensors", device="cpu")
    model, data = trained.model.eval(), trained.data
    refs = reference_indices(len(data.train_labels), 16 if QUICK else 512, seed=0)
    objective = LocalizationObjective(data.train_images, data.train_labels, refs)
    return model, data, channel_space(model), objective, 3 if QUICK else 50


@pytest.fixture(scope="module")
def digits_case(digits_run):
    """The run's first 32 targets (4 in quick mode), noisy and clean interleaved."""
    model, data, space, objective, cap = digits_run
    targets = select_examples(data, "all", limit=4 if QUICK else 32)
    _assert_greedy_peers_agree(model, objective, targets[:4], space, cap)
    return model, space, objective, targets, cap


def _assert_greedy_peers_agree(model, objective, targets, space, cap) -> None:
    """Before anything is timed: batched, one target at a time and the paper's loop zero the
    same channels in the same order on the benchmark's own model, references and targets."""
    batched = greedy_localize(model, objective, targets, space=space, max_channels=cap)
    for b, p in zip(batched, paper_localize(model, objective, targets, space=space,
                                            max_channels=cap), strict=True):
        (one,) = greedy_localize(model, objective, torch.tensor([b.index]), space=space,
                                 max_channels=cap)
        assert (b.channels, b.flipped) == (one.channels, one.flipped) == \
            (p.channels, p.flipped), f"greedy peers differ on target {b.index}"


def _greedy_info(context_info, objective, targets, max_channels):
    return {**context_info, "targets": len(targets), "ref_batch": len(objective.ref),
            "max_channels": max_channels, "model": "cnn", "dataset": "digits"}


def test_greedy_paper_loop(benchmark, digits_case, context_info):
    model, space, objective, targets, cap = digits_case
    benchmark.group = "greedy-digits-cnn"
    benchmark.pedantic(paper_localize, args=(model, objective, targets),
                       kwargs={"space": space, "max_channels": cap}, rounds=1, warmup_rounds=0)
    _record(benchmark, "greedy", "paper_loop", _greedy_info(context_info, objective, targets, cap),
            len(targets), "targets")


def test_greedy_one_at_a_time(benchmark, digits_case, context_info):
    model, space, objective, targets, cap = digits_case
    benchmark.group = "greedy-digits-cnn"

    def loop():
        return [greedy_localize(model, objective, t[None], space=space, max_channels=cap)[0]
                for t in targets]

    benchmark.pedantic(loop, rounds=1, warmup_rounds=0)
    _record(benchmark, "greedy", "one_at_a_time", _greedy_info(context_info, objective, targets, cap),
            len(targets), "targets")


def test_greedy_batched(benchmark, digits_case, context_info):
    model, space, objective, targets, cap = digits_case
    benchmark.group = "greedy-digits-cnn"
    started = time.perf_counter()
    res = benchmark.pedantic(greedy_localize, args=(model, objective, targets),
                             kwargs={"space": space, "max_channels": cap},
                             rounds=1, warmup_rounds=0)
    benchmark.extra_info["mean_channels"] = sum(len(r.channels) for r in res) / len(res)
    benchmark.extra_info["wall_s_all_rounds"] = time.perf_counter() - started
    _record(benchmark, "greedy", "batched", _greedy_info(context_info, objective, targets, cap),
            len(targets), "targets")


@pytest.mark.parametrize("rows", [129, 513, 1024, 4128])
def test_greedy_pass_rows(benchmark, digits_case, context_info, rows):
    """One greedy pass (forward + mask backward, a mask row per example row) at several sizes:
    how busy one target (1 + 128 or 1 + 512 rows) already keeps the CPU, which bounds what
    batching targets can gain beyond the work they share."""
    model, space, objective, _, _ = digits_case
    benchmark.group = "greedy-pass-rows"
    images = objective.images[torch.arange(rows) % len(objective.images)]
    labels = objective.labels[torch.arange(rows) % len(objective.labels)]

    def one_pass():
        m = torch.ones(rows, space.total, requires_grad=True)
        set_masks(ops, space, m)
        loss = F.cross_entropy(model(images), labels, reduction="sum")
        return torch.autograd.grad(loss, m)

    with frozen(model), row_masks(model, space) as ops:
        benchmark.pedantic(one_pass, rounds=rounds(5), warmup_rounds=1)
    benchmark.extra_info.update({**context_info, "rows": rows,
                                 "rows_per_s": rows / benchmark.stats.stats.mean,
                                 "peak_rss_mib": _peak_mib()})


CHUNK = 4 if QUICK else 32  # the runner's default chunk (quick: 4, so there are several)
_CHUNKED: dict[int, list] = {}


def _in_chunks(model, objective, targets, space, cap, cache):
    return [r for part in torch.split(targets, CHUNK)
            for r in greedy_localize(model, objective, part, space=space, max_channels=cap,
                                     cache=cache)]


def _lines(results):
    return [(r.index, r.channels, r.flipped, r.trace) for r in results]


@pytest.fixture(scope="module", params=[32, 288])
def chunked_case(request, digits_run):
    """``count`` targets (noisy and clean interleaved; 8 in quick mode). Before timing: the
    first two chunks give the same lines, traces to the bit, with and without the cache."""
    model, data, space, objective, cap = digits_run
    targets = select_examples(data, "all", limit=8 if QUICK else request.param)
    first = targets[:2 * CHUNK]
    cache = ReferenceCache()
    assert _lines(_in_chunks(model, objective, first, space, cap, cache)) == \
        _lines(_in_chunks(model, objective, first, space, cap, None)), "the cache changed a line"
    return request.param, model, space, objective, targets, cap


def _chunked_info(context_info, objective, targets, cap):
    return {**context_info, "targets": len(targets), "chunk": CHUNK,
            "ref_batch": len(objective.ref), "max_channels": cap, "model": "cnn",
            "dataset": "digits"}


def test_greedy_chunks_each_own_references(benchmark, chunked_case, context_info):
    count, model, space, objective, targets, cap = chunked_case
    benchmark.group = f"greedy-chunks-{count}"
    _CHUNKED[count] = benchmark.pedantic(_in_chunks, args=(model, objective, targets, space,
                                                           cap, None), rounds=1, warmup_rounds=0)
    _record(benchmark, f"chunks-{count}", "each_own",
            _chunked_info(context_info, objective, targets, cap), len(targets), "targets")


def test_greedy_chunks_shared_cache(benchmark, chunked_case, context_info):
    count, model, space, objective, targets, cap = chunked_case
    benchmark.group = f"greedy-chunks-{count}"
    caches = []

    def shared():
        caches.append(ReferenceCache())
        return _in_chunks(model, objective, targets, space, cap, caches[-1])

    got = benchmark.pedantic(shared, rounds=1, warmup_rounds=0)
    if count in _CHUNKED:
        assert _lines(got) == _lines(_CHUNKED[count]), "the timed runs' lines differ"
    benchmark.extra_info.update({"reused_masks": caches[-1].reused,
                                 "cache_entries": len(caches[-1]),
                                 "cache_mib": caches[-1].nbytes / 2**20})
    _record(benchmark, f"chunks-{count}", "shared_cache",
            _chunked_info(context_info, objective, targets, cap), len(targets), "targets")


EXHAUSTIVE_TARGETS = 2 if QUICK else 6


def _step_peers(model, objective, space):
    """One exhaustive step (the first) per target: the channel whose zeroing gives the lowest
    objective over all channels, found by a full forward per channel, by the full scan, or by
    the bounded argmin (its whole result)."""
    pool = torch.arange(space.total)

    def argmin(values):
        return lambda t: int(values(model, objective.inputs(t[None]),
                                    lambda lg: objective(lg, t.expand(len(lg)))[0], sites=space,
                                    candidates=pool, ids=objective.ids(t[None])).argmin())

    def bounded(t):
        return bounded_argmin(model, objective, t, objective.inputs(t[None]),
                              objective.ids(t[None]), space=space,
                              base_mask=torch.ones(space.total, dtype=torch.bool),
                              candidates=pool)

    return {"naive_loop": argmin(naive_ablation_scan),
            "full_scan": argmin(lambda *a, **k: ablation_scan(*a, **k).values),
            "bounded": bounded}


@pytest.fixture(scope="module")
def exhaustive_case(digits_run):
    """The run's first noisy targets; before timing, the three peers pick the same channel for
    each, and the bounded argmin's evaluated counts are kept for the record."""
    model, data, space, objective, _ = digits_run
    targets = select_examples(data, "noisy", limit=EXHAUSTIVE_TARGETS)
    peers = _step_peers(model, objective, space)
    with torch.no_grad():
        picks = {name: [fn(t) for t in targets] for name, fn in peers.items()}
    evaluated = [r.evaluated for r in picks["bounded"]]
    picks["bounded"] = [r.channel for r in picks["bounded"]]
    assert picks["naive_loop"] == picks["full_scan"] == picks["bounded"], picks
    # The 30-epoch run fits its references (measured: 4 to 10 of 480 scanned with them); the
    # quick run's 3 epochs do not, and there every channel is scanned (its cost: the bound's).
    assert QUICK or sum(evaluated) <= 0.1 * len(targets) * space.total, evaluated
    return model, space, objective, targets, peers, evaluated


@pytest.mark.parametrize("peer", ["naive_loop", "full_scan", "bounded"])
def test_exhaustive_step(benchmark, exhaustive_case, context_info, peer):
    model, space, objective, targets, peers, evaluated = exhaustive_case
    benchmark.group = "exhaustive-step-digits-cnn"
    with torch.no_grad():
        benchmark.pedantic(lambda: [peers[peer](t) for t in targets],
                           rounds=rounds(3) if peer != "naive_loop" else 1, warmup_rounds=0)
    benchmark.extra_info["evaluated_in_full"] = evaluated
    _record(benchmark, "exhaustive-step", peer,
            {**context_info, "targets": len(targets), "channels": space.total,
             "ref_batch": len(objective.ref), "model": "cnn", "dataset": "digits"},
            len(targets), "targets")
