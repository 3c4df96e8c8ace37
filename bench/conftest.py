"""Shared benchmark settings.

``MEMKERN_BENCH_QUICK=1`` (CI) shrinks sizes and rounds so every benchmark still runs end to end
in seconds; the numbers it prints are then only a smoke test, not measurements.
"""
import os
import platform

import pytest
import torch

QUICK = os.environ.get("MEMKERN_BENCH_QUICK", "") not in ("", "0")


@pytest.fixture
def quick() -> bool:
    return QUICK


@pytest.fixture
def context_info() -> dict:
    """Versions and machine facts recorded with every benchmark, so a saved result says what
    it was measured on."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "quick": QUICK,
    }


def rounds(full: int) -> int:
    """Timed rounds: ``full`` normally, 1 in quick mode."""
    return 1 if QUICK else full
