"""Every kernel specialization memkern dispatches compiles for real GPUs (sm_80, sm_90) with the
Triton compiler and the ptxas of the triton wheel, on a machine without a GPU.

The interpreter that runs the kernel tests here (conftest sets TRITON_INTERPRET=1) accepts code
the real compiler rejects; the compile runs in a subprocess without it, as the JIT functions
of this process are interpreter stand-ins. The registers/spills table is printed (pytest -s).
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

KERNELS = ("_tied_kernel", "_gathered_fwd_kernel", "_gathered_bwd_kernel")
DTYPES = ("float32", "float16", "bfloat16", "float64")


def test_every_dispatched_specialization_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "memkern.kernels.aot_compile"], env=env,
                         capture_output=True, text=True, timeout=300)
    print(res.stdout)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()[1:-1]]
    got = {(r[0], r[1], r[2]) for r in rows}
    assert got == {(k, d, f"sm_{a}") for k in KERNELS for d in DTYPES for a in (80, 90)}
    # specializations per kernel x dtype x arch: tied 3 key/mode variants, backward 3 flag
    # combinations, forward 1, each at a small and a large tile
    per_kernel = {"_tied_kernel": 6, "_gathered_fwd_kernel": 2, "_gathered_bwd_kernel": 6}
    for kernel, _, _, specs, regs, spills, *_ in rows:
        assert int(specs) == per_kernel[kernel]
        low, high = map(int, regs.split("-"))
        assert 0 < low <= high <= 255  # a thread has at most 255 registers
        assert int(spills) == 0, f"{kernel} spills {spills} bytes per thread: shrink its tile"


def test_refuses_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "memkern.kernels.aot_compile"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "TRITON_INTERPRET=1" in res.stderr
