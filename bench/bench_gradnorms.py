"""Per-example gradient norms on ResNet-9 (32x32, random data, CPU): memkern's ghost and func
modes against a plain forward+backward (the floor), the naive loop, torch.func materializing
every per-example gradient, Opacus (hooks; ghost clipping norms) and BackPACK ``BatchL2Grad``.

BatchNorm in eval mode, and the GroupNorm variant for peers that reject BatchNorm (Opacus).
Peak memory: growth of a fresh process's peak RSS over one call (``gradnorm_methods.py``),
skipped in quick mode.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK, rounds
from gradnorm_methods import METHODS, make_case

from memkern.experiments.gradients.norms import per_example_grad_norms

HERE = Path(__file__).parent
BATCHES = (8,) if QUICK else (32, 128)
_medians: dict[tuple, float] = {}  # (norm, batch, method) -> median seconds, for ratios


def total_norms(result: torch.Tensor) -> torch.Tensor:
    """Each example's whole-model gradient norm, from ``[B]`` or per-group ``[B, G]`` norms."""
    result = result.detach()
    return result.square().sum(1).sqrt() if result.ndim == 2 else result


_references: dict[tuple, torch.Tensor] = {}


def reference_norms(norm: str, batch: int) -> torch.Tensor:
    """The one-backward-per-example loop on the same case, once per (norm, batch)."""
    if (norm, batch) not in _references:
        model, x, y = make_case(norm, batch)
        _references[(norm, batch)] = total_norms(per_example_grad_norms(model, x, y, mode="loop"))
    return _references[(norm, batch)]


def peak_extra_mb(method: str, norm: str, batch: int) -> float | None:
    out = subprocess.run([sys.executable, str(HERE / "gradnorm_methods.py"), method, norm,
                          str(batch)], capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"] / 2**20


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("norm", ["batch", "group"])
def bench_gradnorms(benchmark, context_info, norm, batch, method):
    if method.startswith("opacus"):
        pytest.importorskip("opacus")
    if method.startswith("backpack"):
        pytest.importorskip("backpack")
    model, x, y = make_case(norm, batch)
    try:
        run = METHODS[method](model, x, y)
        got = run()  # warm-up, and a peer that rejects the model says so here
    except (NotImplementedError, ValueError, AttributeError) as e:
        pytest.skip(f"{method} cannot run ResNet-9 with {norm} norm: {str(e).splitlines()[0]}")
    if method != "plain fwd+bwd":  # the floor computes no norms; every other method must agree
        torch.testing.assert_close(total_norms(got), reference_norms(norm, batch),
                                   rtol=1e-3, atol=1e-5, msg=f"{method} computes other norms")
    benchmark.group = f"gradnorms resnet9-32x32 {norm}norm batch{batch}"
    benchmark.extra_info.update(context_info, model="resnet9", image=32, norm=norm, batch=batch,
                                dtype="float32", device="cpu")
    benchmark.pedantic(run, rounds=rounds(3), iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    _medians[(norm, batch, method)] = median
    for ref in ("plain fwd+bwd", "naive loop"):
        if (norm, batch, ref) in _medians:
            benchmark.extra_info[f"x {ref}"] = median / _medians[(norm, batch, ref)]
    if not QUICK:
        benchmark.extra_info["peak_extra_mb"] = peak_extra_mb(method, norm, batch)
