"""The one JSON reader for files a run holds: bounded in size, nesting depth and number length.

A received run's JSON is data of unknown origin; Python's parser recurses once per nesting level
and reads integers of any length, so a file nested 100,000 deep or a 10,000-digit number would
end in a traceback instead of one line. memkern writes nothing deeper than a few levels.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from memkern.errors import MemkernError, RunDirError

MAX_DEPTH = 32
MAX_BYTES = 1 << 30  # a localize.jsonl of every CIFAR-10 example is far below this
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def depth(text: str | bytes) -> int:
    """The deepest nesting of arrays/objects in the JSON ``text`` (strings skipped)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    steps = _OPEN[np.frombuffer(_STRINGS.sub(b"", raw), np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def loads(text: str | bytes, *, source: str, error: type[MemkernError] = RunDirError):
    """``json.loads(text)``, refusing ``text`` nested deeper than MAX_DEPTH or holding a number
    too long to read with ``error`` (a line starting with ``source``); invalid JSON raises
    ``json.JSONDecodeError`` for the caller to word."""
    deep = depth(text)
    if deep > MAX_DEPTH:
        raise error(f"{source} nests JSON {deep} levels deep (memkern writes at most "
                    f"{MAX_DEPTH}); it is not a file memkern wrote: restore it, or move it away")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:  # an integer past Python's digit limit
        raise error(f"{source} holds JSON memkern cannot read ({str(e)[:80]}); restore it, "
                    f"or move it away") from None


def read_text(path: str | Path, *, error: type[MemkernError] = RunDirError,
              max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of ``path``, refused with ``error`` when larger than ``max_bytes``."""
    size = os.stat(path).st_size
    if size > max_bytes:
        raise error(f"{path} is {size:,} bytes, more than the {max_bytes:,} memkern reads from "
                    f"such a file; it is not a file memkern wrote: restore it, or move it away")
    try:
        return Path(path).read_text()
    except UnicodeDecodeError:
        raise error(f"{path} is not a UTF-8 text file; restore it, or move it away") from None
