"""Text cut into training windows, with planted copies each at a window start.

The training stream is read in slots of ``seq_len`` bytes; window ``i`` is the stream's bytes
``[i * seq_len, (i + 1) * seq_len]`` (``seq_len + 1`` bytes: inputs and next-byte targets). A
slot that holds a planted copy starts with it and continues with the text where the previous
slot stopped, so the copy is inserted into the text, not written over it.
"""
from __future__ import annotations

import numpy as np
import torch

from memkern.data.text.inserts import Insert
from memkern.errors import DataError

MIN_WINDOWS = 10


def window_view(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """uint8 ``[W, seq_len + 1]``: the windows of ``stream`` at stride ``seq_len``."""
    count = (len(stream) - 1) // seq_len
    rows = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)
    return torch.from_numpy(np.ascontiguousarray(stream[rows]))


def check_window_count(count: int, what: str, seq_len: int) -> None:
    if count < MIN_WINDOWS:
        raise DataError(f"the {what} text makes {count} windows of --seq-len {seq_len}; at least "
                        f"{MIN_WINDOWS} are needed: give more text or a shorter --seq-len")


def build_windows(text: bytes, inserts: list[Insert], *, seq_len: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(windows, owner)``: uint8 ``[W, seq_len + 1]`` windows of ``text`` with ``reps`` copies
    of each insert, each copy at the start of a seeded random window; ``owner`` int64 ``[W]``
    is the insert id of each copy's window and -1 elsewhere."""
    copies = np.array([ins.id for ins in inserts for _ in range(ins.reps)], dtype=np.int64)
    by_id = {ins.id: ins.text for ins in inserts}
    planted = sum(len(by_id[int(i)]) for i in copies)
    for ins in inserts:
        if len(ins.text) > seq_len:
            raise DataError(f"{ins.kind} {ins.id} is {len(ins.text)} bytes; --seq-len "
                            f"{seq_len} must hold it: raise --seq-len")
    count = (len(text) + planted - 1) // seq_len
    if copies.size and count - len(copies) < MIN_WINDOWS:
        raise DataError(f"{len(copies)} planted copies do not fit in the {count} windows of "
                        f"{len(text)} training bytes with at least {MIN_WINDOWS} plain ones; "
                        f"plant fewer (--canaries, --canary-reps, --dup-reps) or give more text")
    check_window_count(count, "training", seq_len)
    rng = np.random.default_rng([seed, 0x51075])
    owner = np.full(count, -1, dtype=np.int64)
    owner[rng.choice(count, size=len(copies), replace=False)] = rng.permutation(copies)
    pieces, cursor = [], 0
    for slot in range(count):
        head = by_id[int(owner[slot])] if owner[slot] >= 0 else b""
        take = seq_len - len(head)
        pieces += [head, text[cursor:cursor + take]]
        cursor += take
    pieces.append(text[cursor:cursor + 1])  # the last window's last target
    stream = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    return window_view(stream, seq_len), torch.from_numpy(owner)
