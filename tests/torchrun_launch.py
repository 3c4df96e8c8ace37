"""Launch ``memkern`` under torchrun (gloo on CPU) from a test: ``--standalone`` picks a free
port, so launches of several tests do not collide."""
import os
import subprocess
import sys

ENV = {"OMP_NUM_THREADS": "1", "MEMKERN_DIST_TIMEOUT": "120"}


def torchrun_command(args, *, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), "-m", "memkern.cli", *map(str, args)]


def torchrun(args, *, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``memkern ARGS`` as ``nproc`` ranks and wait for it."""
    return subprocess.run(torchrun_command(args, nproc=nproc), capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=timeout)


def start_torchrun(args, *, nproc: int = 2) -> subprocess.Popen:
    """Start ``memkern ARGS`` as ``nproc`` ranks without waiting."""
    return subprocess.Popen(torchrun_command(args, nproc=nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
