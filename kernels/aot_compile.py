"""Compile every kernel specialization the launchers dispatch for real GPU targets, ahead of
time and without a GPU, and report each one's registers and spills.

The Triton interpreter accepts code the real compiler rejects, so kernel tests on a machine
without CUDA prove the math, not that the kernels build. Here the launchers of
:mod:`memkern.kernels.channel_mask_triton` run on CPU tensors with their launches recorded
instead of executed (their own strides, block sizes, grids and flags); each recorded launch is
specialized exactly as Triton's JIT would for a GPU (argument types, ``== 1`` ints as
constants, 16-byte alignment) and compiled to a cubin with the ``ptxas`` the triton wheel
ships. ``n_regs`` / ``n_spills`` are read from the cubin: registers per thread and local
memory bytes per thread, the two numbers Triton's runtime reports after loading a kernel.

Needs the real ``@triton.jit`` functions: run it in a process without ``TRITON_INTERPRET=1``::

    python -m memkern.kernels.aot_compile            # sm_80 and sm_90
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

ARCHS = (80, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (name, shape, channel_dim): the smallest tile (16 pairs x 1 element, a [N, C] layer) and the
# largest (4 pairs x 1024 elements of a 32x32 feature map, the S loop taken once per chunk).
TILES = (("small", (3, 5), 1), ("large", (8, 64, 32, 32), 1))
# Seeds whose site key fits int32 and one whose key does not: the JIT types the key by value.
KEY_SEEDS = (0, 2)


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: the JIT function and the arguments the launcher passed."""

    kernel: object
    args: tuple
    kwargs: dict
    dtype: str
    case: str


@dataclass(frozen=True)
class Compiled:
    kernel: str
    dtype: str
    case: str
    arch: int
    n_regs: int
    n_spills: int
    seconds: float


class _Recorder:
    """Stands in for ``wrap_triton(kernel)``: ``[grid](*args)`` records instead of launching."""

    def __init__(self, sink: list, dtype: str, case: str):
        self.sink, self.dtype, self.case = sink, dtype, case

    def __call__(self, kernel):
        sink, dtype, case = self.sink, self.dtype, self.case

        class Bound:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: sink.append(
                    Launch(kernel, args, kwargs, dtype, case))
        return Bound()


@contextmanager
def _recording(sink: list, dtype: torch.dtype, case: str) -> Iterator[None]:
    from . import channel_mask_triton as launchers

    name = str(dtype).removeprefix("torch.")
    launchers.wrap_triton, real = _Recorder(sink, name, case), launchers.wrap_triton
    try:
        yield
    finally:
        launchers.wrap_triton = real


def dispatched_launches() -> list[Launch]:
    """The launches of every kernel x dtype x constexpr flag x tile, one per distinct
    specialization (what the launchers would compile on a GPU for these inputs)."""
    from . import channel_mask_triton as launchers
    from .channel_mask_reference import site_key

    assert site_key(KEY_SEEDS[0]) < 2**31 <= site_key(KEY_SEEDS[1]), "pick other KEY_SEEDS"
    launches: list[Launch] = []
    for dtype in DTYPES:
        for tile, shape, channel_dim in TILES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(dtype)
            ids = torch.arange(shape[0])
            mask = torch.rand(shape[0], shape[channel_dim], generator=g)
            for mode, seeds in (("train", KEY_SEEDS), ("keep", KEY_SEEDS[:1])):
                for seed in seeds:
                    with _recording(launches, dtype, f"{tile} mode={mode} seed={seed}"):
                        launchers.tied_apply(x, ids, channel_dim=channel_dim, seed=seed,
                                             p_gen=0.2, p_mem=0.1, mode=mode)
            with _recording(launches, dtype, tile):
                launchers.gathered_fwd(x, mask, channel_dim=channel_dim)
            for gx, gm in ((True, False), (False, True), (True, True)):
                with _recording(launches, dtype, f"{tile} grad_x={gx:d} grad_mask={gm:d}"):
                    launchers.gathered_bwd(x, x, mask, channel_dim=channel_dim,
                                           need_grad_x=gx, need_grad_mask=gm)
    return launches


def _specialize(launch: Launch, backend):
    """(signature, constexprs, attrs, options) as the JIT derives them for ``backend``."""
    from triton.runtime.jit import create_function_from_signature

    k = launch.kernel
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = k._pack_args(backend, launch.kwargs, bound,
                                                         specialization, options)
    return signature, constexprs, attrs, options


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) per thread of the one function in ``cubin``, by cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs, local = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text, re.S).groups()
    return int(regs), int(local)


def compile_all(archs=ARCHS) -> list[Compiled]:
    """Compile :func:`dispatched_launches` for each ``sm_<arch>``; a compile error raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from .channel_mask_ops import interpreter_active

    if interpreter_active():
        raise RuntimeError("the Triton interpreter is active (TRITON_INTERPRET=1): AOT compile "
                           "needs the real JIT; run in a process without it")
    launches = dispatched_launches()
    out = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        seen = set()
        for launch in launches:
            signature, constexprs, attrs, options = _specialize(launch, backend)
            key = (launch.kernel.__name__, repr(sorted(signature.items())),
                   repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
            if key in seen:
                continue
            seen.add(key)
            started = time.perf_counter()
            kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                    target=target, options=options.__dict__)
            regs, spills = _resource_usage(kernel.asm["cubin"])
            out.append(Compiled(launch.kernel.__name__, launch.dtype, launch.case, arch, regs,
                                spills, time.perf_counter() - started))
    return out


def table(rows: list[Compiled]) -> str:
    """One line per kernel x dtype x arch: specializations compiled, registers per thread
    (min-max over them), spilled bytes per thread (max), and the case using the most registers."""
    groups: dict[tuple[str, str, int], list[Compiled]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.dtype, r.arch), []).append(r)
    lines = [f"{'kernel':<22} {'dtype':<9} {'arch':>5} {'specs':>5} {'n_regs':>7} "
             f"{'n_spills':>8}  max regs at"]
    for (kernel, dtype, arch), rs in sorted(groups.items()):
        regs = [r.n_regs for r in rs]
        worst = max(rs, key=lambda r: r.n_regs)
        lines.append(f"{kernel:<22} {dtype:<9} {'sm_' + str(arch):>5} {len(rs):>5} "
                     f"{min(regs):>3}-{max(regs):<3} {max(r.n_spills for r in rs):>8} "
                     f" {worst.case}")
    return "\n".join(lines)


def main() -> int:
    started = time.perf_counter()
    try:
        rows = compile_all()
    except Exception as e:  # a compile error: name it on one line, the caller's test fails
        print(f"memkern: error: AOT compile failed: {type(e).__name__}: "
              f"{' '.join(str(e).split())[:2000]}", file=sys.stderr)
        return 1
    print(table(rows))
    print(f"{len(rows)} specializations compiled in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
