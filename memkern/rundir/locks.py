"""One writer at a time: an OS file lock per run directory and per localize output.

The lock is ``fcntl.flock`` on a small file holding the holder's pid, taken without waiting:
a second writer fails at once with :class:`memkern.errors.BusyError` naming that pid. The
kernel drops a flock when its process dies, so the file a killed process leaves behind is
simply locked again by the next one (a stale lock is taken over, never honoured). The holder
removes the file on release; a process that opened it just before then notices, because the
path no longer names the file it locked, and tries again.

Taking a lock also removes the temporaries that killed writers left in the locked folders
(:func:`memkern.rundir.atomic.remove_interrupted_writes`) and the lock files nobody holds
(left by a killed command), and a lock whose pid cannot be written (a full disk) is removed
at once.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from memkern.rundir.atomic import remove_interrupted_writes
from memkern.errors import BusyError, RunDirError
from memkern.rundir.paths import RUN_LOCK
from memkern.rundir.safe_files import open_nofollow, read_text_nofollow, refuse_link, refuse_links

# What a run lock cleans: the folders memkern writes a run's files into.
RUN_FOLDERS = ("", "checkpoints", "grads", "report")
# The folders of a run that memkern writes into, each refused when it is a symbolic link.
WRITTEN_FOLDERS = ("checkpoints", "grads", "report", "scores", "scores/crossval")

_LOCK_NAME = re.compile(r"^\..+\.lock$")
_LOCK_TEXT = re.compile(r"^\d*\n?$")  # what a lock file holds: its holder's pid, or nothing yet

_held: dict[Path, int] = {}  # lock file -> depth: a process may nest holds of one lock


def _holder(path: Path) -> str:
    try:
        pid = read_text_nofollow(path).strip()
    except (OSError, ValueError, RunDirError):  # gone, not text, or a link
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "a process that is starting"


def _acquire(path: Path, what: str) -> int:
    while True:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusyError(f"{what} is in use by another memkern process ({_holder(path)}); "
                            f"wait for it to finish, or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:  # a full disk: no lock file stays behind
                path.unlink(missing_ok=True)
                os.close(fd)
                raise
            return fd
        os.close(fd)  # the holder removed the file between our open and lock: start over


def remove_stale_locks(folder: Path) -> None:
    """Remove the lock files in ``folder`` that no process holds (their command was killed).
    Only files that look like memkern's locks (``.<name>.lock`` holding a pid) are tried."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if not _LOCK_NAME.match(p.name) or p.absolute() in _held or p.is_symlink():
            continue
        try:
            if not p.is_file() or p.stat().st_size > 24 or not _LOCK_TEXT.match(p.read_text()):
                continue
            fd = os.open(p, os.O_RDWR)
        except (OSError, UnicodeDecodeError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live command's lock
            os.close(fd)
            continue
        try:
            if os.stat(p).st_ino == os.fstat(fd).st_ino:
                p.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


@contextlib.contextmanager
def hold(path: str | Path, *, what: str, clean: tuple[Path, ...] = ()) -> Iterator[None]:
    """Hold the lock file ``path`` (its folder must exist) for the ``with`` block; ``what``
    names the locked thing in the refusal. ``clean``: folders whose interrupted writes are
    removed once the lock is held."""
    path = Path(path).absolute()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    fd = _acquire(path, what)
    _held[path] = 1
    try:
        for folder in clean:
            remove_interrupted_writes(folder)
            remove_stale_locks(folder)
        yield
    finally:
        del _held[path]
        path.unlink(missing_ok=True)  # still locked: nobody else can hold this file now
        os.close(fd)


@contextlib.contextmanager
def made_folder(folder: Path) -> Iterator[None]:
    """``folder`` exists during the block; the folders made for it are removed afterwards when
    the block left nothing in them, so a refused command leaves no trace."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for made in created:  # innermost first
            try:
                made.rmdir()
            except OSError:  # not empty: the command wrote there
                break


@contextlib.contextmanager
def hold_run(root: str | Path) -> Iterator[None]:
    """Hold the lock of run directory ``root`` (``root/.memkern.lock``), cleaning the
    interrupted writes of its folders."""
    root = Path(root)
    refuse_links(root / f for f in WRITTEN_FOLDERS)  # writes there would leave the run
    with made_folder(root), hold(root / RUN_LOCK, what=f"run directory {root}",
                             clean=tuple(root / f for f in RUN_FOLDERS)):
        yield


@contextlib.contextmanager
def hold_output(out: str | Path, *, rank: int = 0, size: int = 1) -> Iterator[None]:
    """Hold the lock of output file ``out`` for rank ``rank`` of ``size`` processes started
    together: rank 0 (or a lone process) takes ``.<name>.lock``, rank r > 0 the lock of its
    part file, so a second launch on the same output is refused on every rank."""
    out = Path(out)
    refuse_link(out)  # an explicit --out may be anywhere, but not a link to elsewhere
    name = out.name if rank == 0 else f"{out.name}.rank{rank}-of-{size}"
    with made_folder(out.parent), hold(out.with_name(f".{name}.lock"), what=f"output {out}",
                                   clean=(out.parent,)):
        yield


def for_checkpoint(ckpt: str | Path, lock: Callable[[], contextlib.AbstractContextManager]
                   ) -> contextlib.AbstractContextManager:
    """``lock()`` when the checkpoint ``ckpt`` exists; otherwise no lock (the command fails on
    reading it, before it writes anything), so a mistyped path creates no folder for a lock."""
    return lock() if Path(ckpt).is_file() else contextlib.nullcontext()


def _arguments(func: Callable, args, kwargs) -> dict:
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def locked(lock: Callable[[dict], contextlib.AbstractContextManager]):
    """Decorator: the function runs inside ``lock(its bound arguments by name)``, e.g.
    ``@locked(lambda a: hold_run(a["out"]))``."""
    def wrap(func):
        @functools.wraps(func)
        def run_locked(*args, **kwargs):
            with lock(_arguments(func, args, kwargs)):
                return func(*args, **kwargs)
        return run_locked
    return wrap
