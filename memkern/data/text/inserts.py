"""What a text run plants in its training text: canaries and duplicated held-out paragraphs.

A canary is ``The code of <word> is <8 digits>.`` with a seeded 5-letter word and secret (Carlini
et al. 2019, "The Secret Sharer"); the secret is what extraction and exposure ask the model for,
given the prefix. A duplicated paragraph is a real paragraph of a held-out work, cut to one
window; its first :data:`PARAGRAPH_PREFIX` bytes (2/5 of a shorter one) are the prompt and the
next :data:`PARAGRAPH_SUFFIX` the suffix a model that memorized it reproduces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memkern.errors import DataError

SECRET_DIGITS = 8
WORD_LETTERS = 5
PARAGRAPH_PREFIX = 32
PARAGRAPH_SUFFIX = 48
CANARY, PARAGRAPH = "canary", "paragraph"


@dataclass(frozen=True)
class Insert:
    """One planted text, copied ``reps`` times into the training windows. ``text`` is what is
    inserted; ``prefix`` + ``secret`` is its start (a canary's text is that plus ``.``)."""

    id: int
    kind: str
    prefix: bytes
    secret: bytes
    text: bytes
    reps: int
    source: str = ""  # a paragraph's held-out work

    def record(self, indices: list[int]) -> dict:
        # prefix and secret may cut a paragraph's multi-byte character: shown with U+FFFD there;
        # their byte lengths with the exact text rebuild them.
        return {"id": self.id, "kind": self.kind, "text": self.text.decode(),
                "prefix": self.prefix.decode(errors="replace"), "prefix_bytes": len(self.prefix),
                "secret": self.secret.decode(errors="replace"), "secret_bytes": len(self.secret),
                "reps": self.reps, "source": self.source, "indices": indices}


def canary_length() -> int:
    return len(f"The code of {'x' * WORD_LETTERS} is {'0' * SECRET_DIGITS}.")


def make_canaries(count: int, reps: tuple[int, ...], *, seed: int,
                  documents: list[bytes]) -> list[Insert]:
    """``count`` canaries, the i-th repeated ``reps[i % len(reps)]`` times; words and secrets
    drawn from ``seed``. DataError when a canary's prefix and secret already occur in one of
    ``documents`` (the model could then have learned it from the corpus)."""
    rng = np.random.default_rng([seed, 0xC0DE])
    words: set[bytes] = set()
    out = []
    while len(out) < count:
        word = bytes(rng.integers(ord("a"), ord("z") + 1, WORD_LETTERS).astype(np.uint8))
        secret = bytes(rng.integers(ord("0"), ord("9") + 1, SECRET_DIGITS).astype(np.uint8))
        if word in words:
            continue
        words.add(word)
        prefix = b"The code of " + word + b" is "
        for doc in documents:
            if prefix + secret in doc:
                raise DataError(f"canary {len(out)}'s secret already occurs in the text "
                                f"({(prefix + secret).decode()!r}); pick another --seed")
        out.append(Insert(len(out), CANARY, prefix, secret, prefix + secret + b".",
                          reps[len(out) % len(reps)]))
    return out


def paragraphs_of(data: bytes, *, min_bytes: int) -> list[tuple[int, bytes]]:
    """``(offset, paragraph)`` for every blank-line-separated block of ``data`` of at least
    ``min_bytes`` bytes, whitespace at its ends stripped."""
    out, start = [], 0
    for block in data.split(b"\n\n"):
        text = block.strip()
        if len(text) >= min_bytes:
            out.append((start + block.index(text), text))
        start += len(block) + 2
    return out


def make_paragraphs(count: int, reps: int, *, seed: int, first_id: int, seq_len: int,
                    heldout: list[tuple[str, bytes]]) -> tuple[list[Insert], list[tuple[str, int, int]]]:
    """``count`` paragraphs of the held-out works ``heldout`` (name, bytes), each cut to
    ``seq_len`` bytes and repeated ``reps`` times, ids from ``first_id``; also each one's
    ``(work, start, end)`` byte span, which held-out evaluation leaves out."""
    need = min(PARAGRAPH_PREFIX + PARAGRAPH_SUFFIX, seq_len)
    found = [(name, off, text) for name, data in heldout for off, text in paragraphs_of(
        data, min_bytes=need)]
    if len(found) < count:
        raise DataError(f"--dup-paragraphs {count}: the held-out works hold {len(found)} "
                        f"paragraphs of at least {need} bytes; ask for fewer")
    rng = np.random.default_rng([seed, 0xD0B])
    picks = sorted(rng.choice(len(found), size=count, replace=False).tolist())
    inserts, spans = [], []
    for i, k in enumerate(picks):
        name, off, text = found[k]
        text = text[:seq_len].decode("utf-8", "ignore").encode()  # no cut character at the end
        cut = min(PARAGRAPH_PREFIX, len(text) * 2 // 5)  # 32 of 80, or the same share
        inserts.append(Insert(first_id + i, PARAGRAPH, text[:cut],
                              text[cut:cut + PARAGRAPH_SUFFIX], text, reps, source=name))
        spans.append((name, off, off + len(text)))
    return inserts, spans
