"""``python bench/gpucheck.py --out FILE.json``: everything worth knowing about memkern on one
CUDA GPU, measured in one run (minutes) and written to one JSON file, with the versions report
of ``memkern env`` (:func:`memkern.versions.versions`).

- ``correctness``: the Triton kernels against the torch reference on the same GPU tensors, per
  dtype x layout ([N, C], [N, C, H, W], channels_last, tokens [N, T, C]) x op, forward and
  backward, with the tolerance of :data:`GRAD_MASK_RTOL`; gradcheck in float64;
- ``bandwidth``: GB/s of the channel-mask op (tied and gathered) beside ``x * m`` and a copy;
- ``tied_dropout_step``: ms per SGD step of ResNet-9 at batch 512 with and without tied dropout;
- ``greedy``: greedy localization of 32 targets batched vs one target at a time (digits cnn),
  and the first 4 against the paper's w * dL/dw loop;
- ``ghost``: per-example gradient norms (ghost) vs a plain training step on the same batch;
- ``scan``: the exact ablation scan vs the naive loop (ResNet-9, ViT, ResNet-50: the cases of
  ``ratios.py``), with their largest difference;
- ``compile``: ``torch.compile`` of a tied-dropout model vs eager: outputs, gradients, ms.

A section that fails records its error and the others still run; the exit code is 1 when any
correctness case or section failed. Without CUDA it prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from memkern.kernels.channel_mask import gathered_channel_mask, tied_channel_mask
from memkern.network.sites import example_indices
from memkern.rundir.atomic import atomic_write_json
from memkern.training.step import make_optimizer, sgd_step
from memkern.versions import versions

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# grad_mask sums a channel's products: |kernel - float64 sum| <= rtol * sum |g * x|. Forward
# values and grad_x are one multiply of identical operands in both paths: compared exactly.
GRAD_MASK_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2,
                  torch.bfloat16: 2e-2}
TIED = dict(seed=12345, p_gen=0.4, p_mem=0.3)
MODES = ("train", "own", "keep", "drop")
GREEDY_TARGET = 5.0  # batched greedy localization vs one target at a time, on a GPU


def _layouts(quick: bool) -> list[tuple[str, tuple[int, ...], int, bool]]:
    """(name, shape, channel_dim, channels_last)."""
    n = 5 if quick else 33
    return [("NC", (n, 100), 1, False), ("NCHW", (n, 64, 5, 7), 1, False),
            ("channels_last", (n, 64, 5, 7), 1, True), ("tokens", (n, 17, 96), -1, False)]


def _timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after one warm-up (synchronized on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def correctness(device: torch.device, *, quick: bool) -> dict:
    """Triton (backend "triton") vs the torch reference (backend "torch") on ``device``."""
    g = torch.Generator().manual_seed(0)
    cases = []
    dtypes = (torch.float32, torch.float64) if quick else DTYPES
    for dtype in dtypes:
        for layout, shape, cdim, channels_last in _layouts(quick):
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            grad = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
            ids = torch.randint(0, 2**31, (shape[0],), generator=g).to(device)
            n, c = shape[0], shape[cdim]

            def case(op, got, want, tol=0.0):
                err = _max_err(got, want)
                cases.append({"op": op, "dtype": str(dtype).removeprefix("torch."),
                              "layout": layout, "max_abs_err": err, "tol": tol,
                              "ok": bool(err <= tol)})

            for mode in MODES:
                outs = {}
                for backend in ("triton", "torch"):
                    a = x.detach().clone().requires_grad_()
                    y = tied_channel_mask(a, ids, mode=mode, channel_dim=cdim, backend=backend,
                                          **TIED)
                    y.backward(grad)
                    outs[backend] = (y.detach(), a.grad)
                case(f"tied {mode} forward", outs["triton"][0], outs["torch"][0])
                case(f"tied {mode} grad_x", outs["triton"][1], outs["torch"][1])
            # grad_mask comes in the mask's dtype: float32, or float64 beside float64 x
            mask_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            mask = torch.rand(n, c, generator=g, dtype=mask_dtype).to(device)
            outs = {}
            for backend in ("triton", "torch"):
                a = x.detach().clone().requires_grad_()
                m = mask.detach().clone().requires_grad_()
                y = gathered_channel_mask(a, m, channel_dim=cdim, backend=backend)
                y.backward(grad)
                outs[backend] = (y.detach(), a.grad, m.grad)
            case("gathered forward", outs["triton"][0], outs["torch"][0])
            case("gathered grad_x", outs["triton"][1], outs["torch"][1])
            prod = (grad.double() * x.double()).movedim(cdim, 1).reshape(n, c, -1)
            exact, scale = prod.sum(-1), float(prod.abs().sum(-1).max())
            case("gathered grad_mask", outs["triton"][2], exact,
                 tol=GRAD_MASK_RTOL[dtype] * scale)
    x = torch.randn(3, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
    m = torch.rand(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.arange(3, device=device)
    checks = {
        "gathered": lambda: torch.autograd.gradcheck(
            lambda a, b: gathered_channel_mask(a, b, backend="triton"), (x, m)),
        "tied train": lambda: torch.autograd.gradcheck(
            lambda a: tied_channel_mask(a, ids, mode="train", backend="triton", **TIED), (x,)),
    }
    gradcheck = {name: bool(check()) for name, check in checks.items()}
    failed = [c for c in cases if not c["ok"]]
    return {"cases": len(cases), "failed": failed, "gradcheck_float64": gradcheck,
            "grad_mask_rtol": {str(k).removeprefix("torch."): v
                               for k, v in GRAD_MASK_RTOL.items()},
            "ok": not failed and all(gradcheck.values())}


def bandwidth(device: torch.device, *, quick: bool) -> dict:
    """GB/s (bytes read + written over the median time) of each way to scale channels."""
    shape = (8, 32, 16, 16) if quick else (256, 256, 32, 32)
    out = {"shape": list(shape)}
    for dtype in (torch.float32, torch.bfloat16) if not quick else (torch.float32,):
        x = torch.randn(shape, device=device, dtype=dtype)
        ids = torch.arange(shape[0], device=device)
        mask = torch.rand(shape[:2], device=device)
        m4 = mask.to(dtype)[:, :, None, None]
        ops = {"tied_channel_mask": lambda: tied_channel_mask(x, ids, mode="train", **TIED),
               "gathered_channel_mask": lambda: gathered_channel_mask(x, mask),
               "x_times_m": lambda: x * m4, "copy": lambda: x.clone()}
        moved = 2 * x.numel() * x.element_size()
        out[str(dtype).removeprefix("torch.")] = {
            name: round(moved / _timed(fn, device, 3 if quick else 50) / 1e9, 1)
            for name, fn in ops.items()}
    return out


def _sgd_step_ms(model, x, y, ids, device, reps) -> float:
    opt = make_optimizer(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    return 1e3 * _timed(lambda: sgd_step(model, opt, x, y, ids=ids), device, reps)


def tied_dropout_step(device: torch.device, *, quick: bool) -> dict:
    """ResNet-9 (CIFAR shapes) SGD step at batch 512 with and without tied dropout."""
    from memkern.network.models import build_model
    from memkern.network.tied_dropout import attach_tied_dropout

    batch, size = (8, 16) if quick else (512, 32)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    ids = torch.arange(batch, device=device)
    ms = {}
    for variant in ("plain", "tied"):
        torch.manual_seed(0)
        model = build_model("resnet9", num_classes=10, in_channels=3, image_size=size)
        if variant == "tied":
            attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.2,
                                p_mem=0.1, seed=0)
        ms[variant] = _sgd_step_ms(model.to(device).train(), x, y, ids, device, 2 if quick else 20)
    return {"batch": batch, "ms_per_step": ms, "overhead": ms["tied"] / ms["plain"] - 1}


def _trained_digits(device: torch.device, folder: Path, *, quick: bool):
    from memkern.training.config import TrainConfig
    from memkern.rundir.context import load_trained
    from memkern.training.train import train

    epochs = 1 if quick else 10
    train(TrainConfig(epochs=epochs), out=folder / "run", device=str(device), progress=False)
    ckpt = folder / "run" / "checkpoints" / f"epoch_{epochs:03d}.safetensors"
    return load_trained(ckpt, device=device)


def greedy(trained, device: torch.device, *, quick: bool) -> dict:
    """32 targets localized together vs one at a time (the same channels either way)."""
    from memkern.experiments.localize import (LocalizationObjective, channel_space, greedy_localize,
                                  reference_indices)
    from memkern.experiments.localize.examples import select_examples
    from memkern.experiments.localize.paper_loop import paper_localize

    model, data = trained.model.eval(), trained.data
    refs = reference_indices(len(data.train_labels), 16 if quick else 512, seed=0)
    objective = LocalizationObjective(data.train_images, data.train_labels, refs)
    targets = select_examples(data, "all", limit=2 if quick else 32)
    space, cap = channel_space(model), 3 if quick else 50
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    batched = greedy_localize(model, objective, targets, space=space, max_channels=cap)
    sync()
    middle = time.perf_counter()
    single = [greedy_localize(model, objective, t[None], space=space, max_channels=cap)[0]
              for t in targets]
    sync()
    ended = time.perf_counter()
    speedup = (ended - middle) / (middle - started)
    same = [r.channels for r in batched] == [r.channels for r in single]
    paper = paper_localize(model, objective, targets[:4], space=space, max_channels=cap)
    same_as_paper = [r.channels for r in batched[:4]] == [r.channels for r in paper]
    return {"targets": len(targets), "batched_s": middle - started,
            "one_at_a_time_s": ended - middle, "speedup": speedup,
            "target_speedup": GREEDY_TARGET, "meets_target": speedup >= GREEDY_TARGET,
            "same_channels": same, "same_as_paper_loop_first_4": same_as_paper,
            "ok": same and same_as_paper}


def ghost(trained, device: torch.device, *, quick: bool) -> dict:
    """Per-example gradient norms (ghost) vs one plain forward + backward of the mean loss."""
    from memkern.experiments.gradients.norms import per_example_grad_norms

    model, data = trained.model.eval(), trained.data
    batch = 16 if quick else 256
    x, y = data.train_images[:batch].to(device), data.train_labels[:batch].to(device)
    ids = torch.arange(batch, device=device)

    def plain():
        model.zero_grad(set_to_none=True)
        with example_indices(ids):
            F.cross_entropy(model(x), y).backward()

    reps = 2 if quick else 20
    ghost_ms = 1e3 * _timed(lambda: per_example_grad_norms(model, x, y, ids=ids, mode="ghost"),
                            device, reps)
    plain_ms = 1e3 * _timed(plain, device, reps)
    return {"batch": batch, "ghost_ms": ghost_ms, "plain_step_ms": plain_ms,
            "ratio": ghost_ms / plain_ms}


def scan(device: torch.device, *, quick: bool) -> dict:
    """The exact ablation scan vs the naive loop over channels, on ``ratios.py``'s cases
    (ResNet-9, the ViT's token sites, ResNet-50), one input each; per model and overall."""
    from memkern.experiments.localize import ablation_scan, naive_ablation_scan
    from fixture_models import SCAN, scan_case

    out = {}
    for name in SCAN:
        model, space, cand, x, y = scan_case(name, "quick" if quick else "full")
        model, x, y = model.to(device), x.to(device), y.to(device)
        kwargs = {"sites": space, "candidates": cand}
        with torch.no_grad():
            naive_s = _timed(lambda: naive_ablation_scan(model, x, y, **kwargs), device, 1)
            fast_s = _timed(lambda: ablation_scan(model, x, y, **kwargs), device,
                            1 if quick else 3)
            err = _max_err(ablation_scan(model, x, y, **kwargs).values[cand],
                           naive_ablation_scan(model, x, y, **kwargs)[cand])
        out[name] = {"channels": len(cand), "naive_s": naive_s, "scan_s": fast_s,
                     "speedup": naive_s / fast_s, "max_abs_err": err}
    err = max(v["max_abs_err"] for v in out.values())
    return {**out, "max_abs_err": err, "ok": err <= 1e-4}


def compiled(device: torch.device, *, quick: bool) -> dict:
    """A tied-dropout cnn under ``torch.compile`` vs eager: outputs and gradients, ms/step."""
    from memkern.network.models import build_model
    from memkern.network.tied_dropout import attach_tied_dropout

    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8).to(device)
    attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.2, p_mem=0.1,
                        seed=0)
    batch = 16 if quick else 512
    x = torch.randn(batch, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    ids = torch.arange(batch, device=device)
    # Inductor needs a C++ compiler on CPU; the quick (CPU) run checks the tracing only.
    fast = torch.compile(model, backend="aot_eager" if quick else "inductor")

    def grads(net):
        model.zero_grad(set_to_none=True)
        with example_indices(ids):
            out = net(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    (a, ga), (b, gb) = grads(model), grads(fast)
    err = max([_max_err(a, b)] + [_max_err(p, q) for p, q in zip(ga, gb)])
    reps = 2 if quick else 20
    eager_ms = 1e3 * _timed(lambda: grads(model), device, reps)
    compiled_ms = 1e3 * _timed(lambda: grads(fast), device, reps)
    return {"batch": batch, "max_abs_err": err, "ok": err <= 1e-4, "eager_ms": eager_ms,
            "compiled_ms": compiled_ms}


def run_checks(device: torch.device, *, quick: bool = False) -> dict:
    """Every section on ``device``; a failing section records its error instead of a result."""
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "quick": quick, **versions()}

    def section(name, fn):
        started = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # recorded; the exit code reports it
            report[name] = {"error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc(limit=5)}
        report[name]["seconds"] = time.perf_counter() - started

    section("correctness", lambda: correctness(device, quick=quick))
    section("bandwidth", lambda: bandwidth(device, quick=quick))
    section("tied_dropout_step", lambda: tied_dropout_step(device, quick=quick))
    with tempfile.TemporaryDirectory() as folder:
        trained = {}
        section("train_digits", lambda: trained.update(
            run=_trained_digits(device, Path(folder), quick=quick)) or {})
        if "run" in trained:
            section("greedy", lambda: greedy(trained["run"], device, quick=quick))
            section("ghost", lambda: ghost(trained["run"], device, quick=quick))
    section("scan", lambda: scan(device, quick=quick))
    section("compile", lambda: compiled(device, quick=quick))
    return report


def failures(report: dict) -> list[str]:
    """Names of the sections that failed (an error, or a correctness check that did not hold)."""
    return [name for name, value in report.items() if isinstance(value, dict) and
            ("error" in value or value.get("ok") is False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/gpucheck.py",
        description="Check and measure memkern on one CUDA GPU; write every figure to one "
                    "JSON file. Example: python bench/gpucheck.py --out gpucheck.json")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("memkern: error: gpucheck measures a CUDA GPU and this torch sees none "
              f"(torch {torch.__version__}); run it on a machine with a GPU and a CUDA build "
              "of torch", file=sys.stderr)
        return 2
    report = run_checks(torch.device(args.device))
    atomic_write_json(Path(args.out), report)
    failed = failures(report)
    print(f"gpucheck written to {args.out}" + (f"; failed: {', '.join(failed)}" if failed
                                               else "; every check passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
