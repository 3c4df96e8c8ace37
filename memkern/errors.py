"""Typed errors for bad user input. The CLI turns any of these into one line on stderr and exit 2."""


class MemkernError(Exception):
    """Base class: an error whose message is fit to show a user as it is."""


class ConfigError(MemkernError, ValueError):
    """An option or configuration value is out of range or unknown."""


class DataError(MemkernError, RuntimeError):
    """A dataset file is missing, truncated, of the wrong format, or fails its checksum."""


class CheckpointError(MemkernError, RuntimeError):
    """A checkpoint is missing, corrupt, not memkern's, or of another architecture."""


class RunDirError(MemkernError, RuntimeError):
    """A run directory is missing pieces, or exists where a fresh one was asked for."""


class UnsupportedLayerError(ConfigError):
    """A layer has no per-example gradient rule for the mode asked for."""


class DistributedError(MemkernError, RuntimeError):
    """The processes of a torchrun launch could not join, or one stopped waiting for the others."""


class BusyError(MemkernError, RuntimeError):
    """Another process holds the lock of a run directory or an output file."""


class OutputNotOursError(MemkernError, RuntimeError):
    """An output path holds a file that the command did not write; it is left untouched."""


class DivergedError(MemkernError, RuntimeError):
    """Training produced a non-finite loss or parameter; nothing non-finite was saved."""


# errno -> what the user can do about it, for the one line an OSError becomes.
_OS_FIXES = {
    "EACCES": "check the permissions, or choose another path",
    "EPERM": "check the permissions, or choose another path",
    "EROFS": "the filesystem is read-only: choose a path on a writable one",
    "ENOSPC": "the disk is full: free some space and rerun (completed work is kept)",
    "EDQUOT": "the disk quota is exhausted: free some space and rerun (completed work is kept)",
    "ENOENT": "check that the path exists",
    "ENOTDIR": "a part of the path is a file, not a directory",
    "EISDIR": "it is a directory; pass a file",
    "ENAMETOOLONG": "choose a shorter path",
    "EMFILE": "too many open files: raise `ulimit -n`",
}


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a non-UTF-8 file name shown as escapes (``\\xff``),
    so it can be printed or written into a UTF-8 file."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def os_error_message(error: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do about it."""
    import errno

    name = errno.errorcode.get(error.errno or 0, "")
    reason = error.strerror or str(error) or type(error).__name__
    path = error.filename if error.filename is not None else None
    where = f" {path}" if path is not None else ""
    if error.filename2 is not None:
        where += f" -> {error.filename2}"
    fix = _OS_FIXES.get(name)
    return f"cannot access{where}: {reason}" + (f"; {fix}" if fix else "")
