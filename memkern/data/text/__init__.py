"""Text runs' data: a corpus cut into windows of bytes, with canaries and duplicated paragraphs
planted in the training windows (docs/text.md).

``text:shakespeare``, ``text:stdlib`` or ``text:PATH`` names the corpus (see
:mod:`memkern.data.text.corpus`). Whole works are held out (a seeded choice of at least
:data:`HELDOUT_FRACTION` of the bytes), never windows of a training work. An example is a
window of ``seq_len`` input bytes with its next-byte targets and its dataset index.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from memkern.data.text.corpus import BUILTIN_CORPORA, Document, load_documents
from memkern.data.text.inserts import CANARY, Insert, make_canaries, make_paragraphs
from memkern.data.text.windows import build_windows, check_window_count, window_view
from memkern.errors import ConfigError, DataError

PREFIX = "text:"
VOCAB = 256
HELDOUT_FRACTION = 0.1
MAX_HELDOUT_WINDOWS = 256  # evaluated every epoch: evenly spaced over the held-out works

__all__ = ["PREFIX", "VOCAB", "TextData", "is_text", "load_text_data", "text_source"]


def is_text(dataset: str) -> bool:
    return dataset.startswith(PREFIX)


def text_source(dataset: str) -> str:
    """``shakespeare``, ``stdlib`` or the path of a ``text:...`` dataset name."""
    source = dataset[len(PREFIX):]
    if not source:
        raise ConfigError(f"dataset {dataset!r} names no corpus: pass text:shakespeare, "
                          f"text:stdlib or text:PATH (a UTF-8 .txt file or folder)")
    return source


@dataclass
class TextData:
    """A text run's windows. ``train_windows`` uint8 ``[W, seq_len + 1]``; ``owner`` int64
    ``[W]``: the id of the insert whose copy starts the window, -1 for plain text;
    ``heldout_windows`` uint8 ``[H, seq_len + 1]`` from the held-out works only."""

    name: str
    seq_len: int
    train_windows: torch.Tensor
    owner: torch.Tensor
    heldout_windows: torch.Tensor
    inserts: list[Insert]
    train_docs: list[str]
    heldout_docs: list[str]
    num_classes: int = VOCAB
    train_images: torch.Tensor = field(init=False)  # inputs  int64 [W, seq_len]
    train_labels: torch.Tensor = field(init=False)  # targets int64 [W, seq_len]

    def __post_init__(self):
        self.train_images = self.train_windows[:, :-1].long()
        self.train_labels = self.train_windows[:, 1:].long()

    @property
    def noisy_mask(self) -> torch.Tensor:
        """bool ``[W]``: windows that start with a planted copy (the "memorized" split)."""
        return self.owner >= 0

    @property
    def mask_keys(self) -> torch.Tensor:
        """int64 ``[W]``: the key of each window's tied-dropout mask: its index, or for every copy
        of insert ``i`` the same key ``W + i`` (all copies share one mask, as in MemSinks)."""
        return torch.where(self.owner >= 0, len(self.owner) + self.owner,
                           torch.arange(len(self.owner)))

    def copies(self, insert_id: int) -> list[int]:
        return torch.nonzero(self.owner == insert_id).flatten().tolist()

    def canaries(self) -> list[Insert]:
        return [i for i in self.inserts if i.kind == CANARY]

    def record(self) -> dict:
        """``canaries.json``: every insert with the window indices of its copies."""
        return {"dataset": self.name, "seq_len": self.seq_len, "vocab": self.num_classes,
                "num_train": len(self.owner), "num_heldout": len(self.heldout_windows),
                "train_docs": self.train_docs, "heldout_docs": self.heldout_docs,
                "inserts": [i.record(self.copies(i.id)) for i in self.inserts]}


def _heldout_split(docs: list[Document], seed: int) -> tuple[list[Document], list[Document]]:
    if len(docs) < 2:
        raise DataError(f"the corpus holds one document ({docs[0].name}); held-out text is whole "
                        f"documents: give a folder of several .txt files or one longer file")
    order = np.random.default_rng([seed, 0x4E1D]).permutation(len(docs))
    total, held, chosen = sum(len(d.data) for d in docs), 0, set()
    for k in order[:-1]:
        if held >= HELDOUT_FRACTION * total:
            break
        chosen.add(int(k))
        held += len(docs[k].data)
    return ([d for i, d in enumerate(docs) if i not in chosen],
            [d for i, d in enumerate(docs) if i in chosen])


def _budget(data: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes of ``data`` (0: all), cut back to a line break."""
    if not limit or len(data) <= limit:
        return data
    cut = data.rfind(b"\n", 0, limit)
    return data[:cut + 1 if cut > 0 else limit]


def _heldout_windows(docs: list[Document], spans: list[tuple[str, int, int]],
                     seq_len: int) -> torch.Tensor:
    """Windows of the held-out works, none overlapping a duplicated paragraph, at most
    :data:`MAX_HELDOUT_WINDOWS` of them, evenly spaced."""
    out = []
    for doc in docs:
        stream = np.frombuffer(doc.data, dtype=np.uint8)
        if len(stream) <= seq_len:
            continue
        windows = window_view(stream, seq_len)
        starts = np.arange(len(windows)) * seq_len
        keep = np.ones(len(windows), dtype=bool)
        for name, lo, hi in spans:
            if name == doc.name:
                keep &= (starts + seq_len + 1 <= lo) | (starts >= hi)
        out.append(windows[torch.from_numpy(keep)])
    windows = torch.cat(out) if out else torch.zeros(0, seq_len + 1, dtype=torch.uint8)
    check_window_count(len(windows), "held-out", seq_len)
    if len(windows) > MAX_HELDOUT_WINDOWS:
        windows = windows[np.linspace(0, len(windows) - 1, MAX_HELDOUT_WINDOWS).astype(np.int64)]
    return windows


def load_text_data(dataset: str, *, seq_len: int, seed: int, canaries: int = 0,
                   canary_reps: tuple[int, ...] = (1,), dup_paragraphs: int = 0,
                   dup_reps: int = 1, text_bytes: int = 0) -> TextData:
    """The windows of ``dataset`` (``text:...``): training works (their first ``text_bytes``
    bytes, 0 = all) with ``canaries`` canaries and ``dup_paragraphs`` held-out paragraphs
    planted, and the held-out works' windows."""
    docs = load_documents(text_source(dataset))
    train_docs, heldout_docs = _heldout_split(docs, seed)
    text = _budget(b"".join(d.data for d in train_docs), text_bytes)
    planted = make_canaries(canaries, canary_reps, seed=seed, documents=[d.data for d in docs])
    paragraphs, spans = make_paragraphs(dup_paragraphs, dup_reps, seed=seed,
                                        first_id=len(planted), seq_len=seq_len,
                                        heldout=[(d.name, d.data) for d in heldout_docs])
    inserts = planted + paragraphs
    windows, owner = build_windows(text, inserts, seq_len=seq_len, seed=seed)
    return TextData(name=dataset, seq_len=seq_len, train_windows=windows, owner=owner,
                    heldout_windows=_heldout_windows(heldout_docs, spans, seq_len),
                    inserts=inserts, train_docs=[d.name for d in train_docs],
                    heldout_docs=[d.name for d in heldout_docs])
