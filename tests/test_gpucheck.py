"""``python bench/gpucheck.py``: without CUDA one line and exit 2, no file; every section of
the orchestrator runs (quick sizes; on CPU Triton under the interpreter) and records figures,
not errors. Quick mode compiles with the aot_eager backend (inductor on CPU needs a C++
compiler)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # the GPU check is a bench tool, not part of the library
from gpucheck import failures, run_checks  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_one_line_exit_2(tmp_path):
    out = tmp_path / "g.json"
    res = subprocess.run([sys.executable, str(BENCH / "gpucheck.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memkern: error: gpucheck measures a CUDA")
    assert not out.exists()


@pytest.mark.kernels
def test_every_section_runs_quick():
    report = run_checks(torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=True)
    assert failures(report) == [], {k: v.get("error") for k, v in report.items()
                                    if isinstance(v, dict)}
    assert report["correctness"]["cases"] == 2 * 4 * (4 * 2 + 3)  # dtypes x layouts x ops
    assert set(report["bandwidth"]["float32"]) == {"tied_channel_mask", "gathered_channel_mask",
                                                   "x_times_m", "copy"}
    assert report["greedy"]["same_channels"] is True
    assert report["scan"]["max_abs_err"] < 1e-4
    assert report["compile"]["ok"]
