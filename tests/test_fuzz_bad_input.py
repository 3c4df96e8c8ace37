"""Property-based bad input: bad CLI options and damaged files of every format memkern reads
(config.json, metrics.jsonl, localize.jsonl, safetensors headers, idx, CIFAR-10 batches, SVHN
.mat, tar.gz, npz), and a received run's hostile parts (links where memkern writes, JSON nested
past the bound, headers claiming more than the file, model specs naming code) always end in
exit code 2 and one `memkern: error:` line, never a traceback, and
change no file that existed before.

Every strategy draws inputs that are invalid by construction (a cut, a field of the wrong type,
a value out of range, bytes under a CRC), so the property is exact: nothing here may succeed.
Derandomized with bounded example counts, so CI runs the same inputs every time, in about a
minute on two cores.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import struct
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot
from formats import MNIST_NAMES, idx_bytes, random_mnist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data_files import CIFAR_FILES, cifar_batch, py2_dumps, random_svhn

from memkern.training.config import MAX_SEED, TrainConfig
from memkern.rundir.paths import RunDir


def fuzz(n: int):
    n = int(os.environ.get("FUZZ_N", n))
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def base(tiny_run, tmp_path_factory):
    """A module folder for the examples, and the shared run (never written: copied first)."""
    return tmp_path_factory.mktemp("fuzz"), tiny_run


def fresh(base_dir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=base_dir))


def refused(args, *folders: Path, env: dict | None = None):
    """Run memkern; one line, exit 2, no traceback, every file under ``folders`` unchanged."""
    before = snapshot(*folders)
    assert_one_line_error(run_cli(*args, env=env))
    assert_unchanged(before, *folders)


# ---------------------------------------------------------------- values and JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
not_numbers = st.text(min_size=1, max_size=8).filter(lambda s: _not_number(s))


def _not_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip() != "" and not text.startswith("-")  # a leading '-' reads as option
    return False


def finite_below(limit: float):
    return st.floats(max_value=limit, allow_nan=False, allow_infinity=False,
                     exclude_max=True)


def non_finite():
    return st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "1e400"])


# ---------------------------------------------------------------- CLI options

TRAIN_FLOATS = {  # option -> strategy of bad values (as text)
    "--lr": st.one_of(non_finite(), finite_below(0.0).map(repr), st.just("0")),
    "--weight-decay": st.one_of(non_finite(), finite_below(0.0).map(repr)),
    "--noise": st.one_of(non_finite(), st.floats(min_value=1.0, max_value=1e30).map(repr),
                         st.floats(max_value=-1e-9, min_value=-1e30).map(repr)),
    "--warmup": st.one_of(non_finite(), st.floats(min_value=1.0, max_value=1e9).map(repr)),
    "--p-gen": st.one_of(non_finite(), st.floats(min_value=1.0, max_value=1e9).map(repr),
                         st.floats(max_value=0.0, min_value=-1e9).map(repr)),
    "--p-mem": st.one_of(non_finite(), st.floats(min_value=1.0, max_value=1e9,
                                                 exclude_min=True).map(repr)),
}
TRAIN_INTS = {
    "--epochs": st.integers(max_value=0, min_value=-10**30),
    "--batch-size": st.integers(max_value=0, min_value=-10**30),
    "--seed": st.integers(min_value=MAX_SEED + 1, max_value=10**40) | st.integers(max_value=-1),
}
GOOD_TRAIN = st.lists(st.sampled_from([["--model", "mlp"], ["--epochs", "2"], ["--noise", "0.2"],
                                       ["--norm", "group"], ["--seed", "7"]]),
                      max_size=3).map(lambda opts: [a for o in opts for a in o])


@st.composite
def bad_train_options(draw) -> list[str]:
    kind = draw(st.sampled_from(["float", "int", "choice", "text-for-number", "unknown"]))
    if kind == "float":
        option = draw(st.sampled_from(sorted(TRAIN_FLOATS)))
        bad = [option, draw(TRAIN_FLOATS[option])]
        if option in ("--p-gen", "--p-mem"):
            bad.append("--tied-dropout")
    elif kind == "int":
        option = draw(st.sampled_from(sorted(TRAIN_INTS)))
        bad = [option, str(draw(TRAIN_INTS[option]))]
    elif kind == "choice":
        option = draw(st.sampled_from(["--dataset", "--model", "--norm", "--preset", "--device"]))
        bad = [option, draw(st.text(min_size=1, max_size=10).filter(
            lambda s: s not in ("digits", "mnist", "cnn", "mlp", "batch", "group", "auto", "cpu")
            and not s.startswith("-")))]
    elif kind == "text-for-number":
        option = draw(st.sampled_from(sorted({*TRAIN_FLOATS, *TRAIN_INTS})))
        bad = [option, draw(not_numbers)]
    else:
        bad = ["--" + draw(st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
                           .filter(lambda s: not _is_train_option(s)))]
    # Valid options first (click keeps the last of a repeated option, so none may follow the
    # bad one); a one-epoch mlp keeps a wrongly accepted input cheap to notice.
    good = [a for pair in zip(*[iter(["--model", "mlp", "--epochs", "1", *draw(GOOD_TRAIN)])] * 2)
            if pair[0] != bad[0] for a in pair]
    return good + bad


def _is_train_option(name: str) -> bool:
    from memkern.cli.train import train
    return any(o.startswith(f"--{name}") for p in train.params for o in p.opts + p.secondary_opts)


@fuzz(120)
@given(options=bad_train_options())
def test_fuzz_train_options(base, options):
    where = fresh(base[0])
    out = where / "run"
    refused(["train", "--out", out, "--no-progress", *options], where)
    assert not out.exists()


LOCALIZE_BAD = {
    "--max-channels": st.integers(max_value=0, min_value=-10**6).map(str),
    "--eot": st.integers(max_value=-1, min_value=-10**6).map(str),
    "--ref-batch": st.integers(max_value=0, min_value=-10**6).map(str),
    "--chunk": st.integers(max_value=0, min_value=-10**6).map(str),
    "--candidates": st.integers(max_value=0, min_value=-10**6).map(str),
    "--seed": (st.integers(min_value=MAX_SEED + 1, max_value=10**30)
               | st.integers(max_value=-1, min_value=-10**30)).map(str),
    "--method": st.text(min_size=1, max_size=8).filter(
        lambda s: s not in ("greedy", "exhaustive") and not s.startswith("-")),
    "--limit": st.integers(max_value=0, min_value=-10**6).map(str),
}


@fuzz(40)
@given(option=st.sampled_from(sorted(LOCALIZE_BAD)), data=st.data())
def test_fuzz_localize_options(base, option, data):
    where = fresh(base[0])
    shutil.copytree(base[1], where / "run")
    value = data.draw(LOCALIZE_BAD[option])
    refused(["localize", "--ckpt", RunDir(where / "run").checkpoint_path(3), "--examples",
             "all", "--ref-batch", "8", "--no-progress", "--device", "cpu", option, value], where)


ANALYSES = st.sampled_from([
    ("retrain", ["--epochs"], st.integers(max_value=0, min_value=-1000).map(str)),
    ("retrain", ["--from-epoch"], st.integers(min_value=4, max_value=10**6).map(str)
     | st.integers(max_value=-1, min_value=-10**6).map(str)),
    ("retrain", ["--lr"], non_finite() | finite_below(0.0).map(repr)),
    ("retrain", ["--groups"], st.text("abcxyz_", min_size=1, max_size=8)),
    ("rewind", ["--epochs"], st.integers(min_value=4, max_value=10**6).map(str)
     | not_numbers.filter(lambda s: "," not in s)),
    ("rewind", ["--groups"], st.text("abcxyz_", min_size=1, max_size=8)),
    ("grads", ["--batch-size"], st.integers(max_value=0, min_value=-1000).map(str)),
    ("grads", ["--epochs"], st.integers(min_value=4, max_value=10**6).map(str)),
    ("grads", ["--mode"], st.text("abcxyz", min_size=1, max_size=6)),
])


@fuzz(30)
@given(case=ANALYSES, data=st.data())
def test_fuzz_analysis_options(base, case, data):
    command, option, values = case
    where = fresh(base[0])
    shutil.copytree(base[1], where / "run")
    refused([command, "--run", where / "run", "--no-progress", "--device", "cpu", *option,
             data.draw(values)], where)


# ---------------------------------------------------------------- config.json


FIELD_TYPES = {"dataset": str, "model": str, "norm": str, "noise": float, "seed": int,
               "epochs": int, "batch_size": int, "lr": float, "momentum": float,
               "weight_decay": float, "warmup": float, "lr_schedule": str, "augment": bool,
               "data_dir": str,
               "tied_dropout": bool, "p_gen": float, "p_mem": float, "dropout_sites": list}


def _wrong_type(value, kind) -> bool:
    if kind is float:
        return not (isinstance(value, (int, float)) and not isinstance(value, bool))
    if kind is int:
        return not (isinstance(value, int) and not isinstance(value, bool))
    if kind is list:
        return not (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if kind is str:
        return not isinstance(value, str) and value is not None
    return not isinstance(value, kind)


OUT_OF_RANGE = {"noise": st.floats(min_value=1.0, max_value=1e300) | st.floats(max_value=-1e-9,
                                                                              min_value=-1e300),
                "epochs": st.integers(max_value=0), "batch_size": st.integers(max_value=0),
                "lr": st.floats(max_value=0.0, min_value=-1e300),
                "seed": st.integers(min_value=MAX_SEED + 1) | st.integers(max_value=-1),
                "weight_decay": st.floats(max_value=-1e-300, min_value=-1e300),
                "momentum": st.floats(min_value=1.0, max_value=1e300),
                "warmup": st.floats(min_value=1.0, max_value=1e300)}


@st.composite
def bad_configs(draw) -> bytes:
    good = json.loads(TrainConfig(model="mlp", epochs=3).to_json())
    kind = draw(st.sampled_from(["not-object", "wrong-type", "out-of-range", "unknown-field",
                                 "not-json", "not-utf8", "non-finite"]))
    if kind == "not-object":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "wrong-type":
        name = draw(st.sampled_from(sorted(FIELD_TYPES)))
        good[name] = draw(json_values.filter(lambda v: _wrong_type(v, FIELD_TYPES[name])))
    elif kind == "out-of-range":
        name = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        good[name] = draw(OUT_OF_RANGE[name])
    elif kind == "unknown-field":
        good[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in good))] = \
            draw(json_values)
    elif kind == "non-finite":
        good[draw(st.sampled_from(["lr", "noise", "momentum", "p_gen"]))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))
    text = json.dumps(good)
    if kind == "not-json":
        cut = draw(st.integers(min_value=1, max_value=len(text) - 1))
        return text[:cut].encode()  # a prefix of an object is never a whole one
    if kind == "not-utf8":
        at = draw(st.integers(min_value=0, max_value=len(text)))
        return text[:at].encode() + b"\xff\xfe" + text[at:].encode()
    return text.encode()


@fuzz(80)
@given(config=bad_configs(), command=st.sampled_from(["report", "rewind", "train", "grads"]))
def test_fuzz_config_json(base, config, command):
    where = fresh(base[0])
    run = where / "run"
    shutil.copytree(base[1], run)
    (run / "config.json").write_bytes(config)
    args = {"report": ["report", "--run", run],
            "rewind": ["rewind", "--run", run, "--no-progress"],
            "grads": ["grads", "--run", run, "--no-progress"],
            "train": ["train", "--out", run, "--resume", "--no-progress"]}[command]
    refused(args, where)


# ---------------------------------------------------------------- metrics.jsonl

bad_metric_lines = st.one_of(
    json_values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    st.dictionaries(st.sampled_from(["train_loss", "clean_acc", "lr"]),
                    st.floats(allow_nan=False), max_size=3).map(json.dumps),  # no epoch
    st.fixed_dictionaries({"epoch": json_values.filter(
        lambda v: not (isinstance(v, int) and not isinstance(v, bool) and v >= 1))}).map(json.dumps),
    st.fixed_dictionaries({"epoch": st.integers(1, 3), "clean_acc": json_values.filter(
        lambda v: isinstance(v, bool) or not isinstance(v, (int, float)))}).map(json.dumps),
    st.text(min_size=1, max_size=30).filter(lambda s: "\n" not in s and "\r" not in s
                                            and s.strip() and not _is_json(s)),
)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@fuzz(50)
@given(line=bad_metric_lines, at=st.integers(0, 2), command=st.sampled_from(["report", "train"]))
def test_fuzz_metrics_jsonl(base, line, at, command):
    """A damaged line anywhere but last (the last may be torn by a kill, and is skipped)."""
    where = fresh(base[0])
    run = RunDir(where / "run")
    shutil.copytree(base[1], run.root)
    lines = run.metrics_path.read_text().splitlines()
    lines.insert(at, line)
    run.metrics_path.write_text("\n".join(lines) + "\n")
    run.checkpoint_path(3).unlink()  # leaves epoch 3 to resume
    args = (["report", "--run", run.root] if command == "report"
            else ["train", "--out", run.root, "--resume", "--no-progress"])
    refused(args, where)


# ---------------------------------------------------------------- localize.jsonl


@st.composite
def foreign_localize_outputs(draw) -> bytes:
    good = {"index": 3, "settings": {}}
    bad_line = draw(st.one_of(
        json_values.filter(lambda v: not (isinstance(v, dict) and {"index", "settings"} <= set(v)))
        .map(json.dumps),
        st.text(min_size=1, max_size=30).filter(lambda s: "\n" not in s and not _is_json(s)),
    ))
    lines = [json.dumps(good)] * draw(st.integers(0, 2))
    lines.insert(draw(st.integers(0, len(lines))), bad_line)
    body = "\n".join(lines) + "\n"  # every line complete: none of them is torn
    if draw(st.booleans()):
        return body.encode()
    return b"\xff" + body.encode()  # not text at all


@fuzz(30)
@given(content=foreign_localize_outputs())
def test_fuzz_localize_output(base, content):
    where = fresh(base[0])
    shutil.copytree(base[1], where / "run")
    out = where / "notes.jsonl"
    out.write_bytes(content)
    refused(["localize", "--ckpt", RunDir(where / "run").checkpoint_path(3), "--out", out,
             "--examples", "all", "--limit", "2", "--no-progress", "--device", "cpu"], where)


# ---------------------------------------------------------------- safetensors headers


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _join_safetensors(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@st.composite
def damaged_checkpoints(draw, raw: bytes) -> bytes:
    header, data = _split_safetensors(raw)
    size = int.from_bytes(raw[:8], "little")
    kind = draw(st.sampled_from(["length", "header", "metadata", "truncate", "offsets"]))
    if kind == "length":
        new = draw(st.integers(0, 2**64 - 1).filter(lambda n: n != size))
        return new.to_bytes(8, "little") + raw[8:]
    if kind == "header":
        return _join_safetensors(draw(json_values), data)
    if kind == "metadata":
        meta = header["__metadata__"]
        key = draw(st.sampled_from(["format", "version", "epoch", "config"]))
        meta[key] = draw(st.one_of(st.text(max_size=20), json_values.map(json.dumps))
                         .filter(lambda v: v != meta[key] and not (
                             key == "config" and _parses_to_config(v))))
        return _join_safetensors(header, data)
    if kind == "offsets":
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, draw(st.integers(0, 2**40).filter(
            lambda e: e != end))]
        return _join_safetensors(header, data)
    return raw[:draw(st.integers(0, len(raw) - 1))]


def _parses_to_config(text: str) -> bool:
    """A metadata config that rebuilds some model (which the tensors would not fit: refused
    too, but by another check; kept out so each draw tests the header)."""
    try:
        TrainConfig.from_json(text)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def checkpoint_bytes(base) -> bytes:
    return RunDir(base[1]).checkpoint_path(3).read_bytes()


@fuzz(60)
@given(data=st.data(), command=st.sampled_from(["evaluate", "localize"]))
def test_fuzz_safetensors_header(base, checkpoint_bytes, data, command):
    where = fresh(base[0])
    ckpt = where / "run" / "checkpoints" / "epoch_003.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(data.draw(damaged_checkpoints(checkpoint_bytes)))
    args = (["evaluate", "--ckpt", ckpt] if command == "evaluate" else
            ["localize", "--ckpt", ckpt, "--limit", "1", "--no-progress", "--device", "cpu"])
    refused(args, where)


# ---------------------------------------------------------------- idx (MNIST)


@st.composite
def damaged_idx(draw, raw: bytes, ndim: int) -> bytes:
    header = 4 + 4 * ndim
    kind = draw(st.sampled_from(["truncate", "append", "magic", "dim", "label"]
                                if ndim == 1 else ["truncate", "append", "magic", "dim"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "append":
        return raw + draw(st.binary(min_size=1, max_size=64))
    if kind == "magic":
        magic = int.from_bytes(raw[:4], "big")
        return struct.pack(">I", draw(st.integers(0, 2**32 - 1).filter(lambda m: m != magic))) \
            + raw[4:]
    if kind == "dim":
        i = draw(st.integers(0, ndim - 1))
        old = int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
        new = draw(st.integers(0, 2**32 - 1).filter(lambda d: d != old))
        return raw[:4 + 4 * i] + struct.pack(">I", new) + raw[8 + 4 * i:]
    at = draw(st.integers(header, len(raw) - 1))  # a label outside 0..9
    return raw[:at] + bytes([draw(st.integers(10, 255))]) + raw[at + 1:]


@fuzz(50)
@given(data=st.data(), key=st.sampled_from(sorted(MNIST_NAMES)), gz=st.booleans())
def test_fuzz_idx_files(base, data, key, gz):
    where = fresh(base[0])
    arrays = random_mnist(np.random.default_rng(0), n_train=5, n_test=3)
    folder = where / "data"
    folder.mkdir()
    for k, name in MNIST_NAMES.items():
        raw = idx_bytes(arrays[k])
        if k == key:
            raw = data.draw(damaged_idx(raw, arrays[k].ndim))
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw, mtime=0)
                                                              if gz else raw)
    refused(["train", "--dataset", "mnist", "--data-dir", folder, "--out", where / "run",
             "--no-progress"], where)
    assert not (where / "run").exists()


@fuzz(20)
@given(data=st.data(), key=st.sampled_from(sorted(MNIST_NAMES)))
def test_fuzz_gzip_bytes_of_idx(base, data, key):
    """Any byte of the deflate stream or trailer flipped: gzip's CRC or its decoder objects."""
    where = fresh(base[0])
    arrays = random_mnist(np.random.default_rng(0), n_train=5, n_test=3)
    folder = where / "data"
    folder.mkdir()
    for k, name in MNIST_NAMES.items():
        raw = gzip.compress(idx_bytes(arrays[k]), mtime=0)
        if k == key:
            at = data.draw(st.integers(10, len(raw) - 1))  # past the 10-byte gzip header
            raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1:]
        (folder / (name + ".gz")).write_bytes(raw)
    refused(["train", "--dataset", "mnist", "--data-dir", folder, "--out", where / "run",
             "--no-progress"], where)


# ---------------------------------------------------------------- CIFAR-10 batches


@st.composite
def damaged_batches(draw) -> bytes:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    batch = cifar_batch(rng, 4)
    kind = draw(st.sampled_from(["truncate", "label", "labels-type", "count", "shape", "dtype",
                                 "missing", "bytes", "global"]))
    if kind == "truncate":
        raw = py2_dumps(batch)
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "label":
        batch["labels"][draw(st.integers(0, 3))] = draw(
            st.integers(min_value=10, max_value=2**80) | st.integers(max_value=-1,
                                                                     min_value=-2**80))
    elif kind == "labels-type":
        batch["labels"][draw(st.integers(0, 3))] = draw(
            st.floats() | st.text(max_size=4) | st.none() | st.booleans())
    elif kind == "count":
        batch["labels"] = batch["labels"][:draw(st.integers(0, 3))]
    elif kind == "shape":
        width = draw(st.integers(1, 4000).filter(lambda w: w != 3072))
        batch["data"] = rng.integers(0, 256, (4, width), dtype=np.uint8)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([np.int16, np.float32, np.int64, np.uint16]))
        batch["data"] = batch["data"].astype(dtype)
    elif kind == "missing":
        del batch[draw(st.sampled_from(["data", "labels"]))]
    elif kind == "global":  # a pickle that would run code if unpickled naively
        return b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    else:
        return draw(st.binary(min_size=0, max_size=200))
    return py2_dumps(batch)


@fuzz(50)
@given(content=damaged_batches(), name=st.sampled_from(CIFAR_FILES))
def test_fuzz_cifar_batches(base, content, name):
    where = fresh(base[0])
    rng = np.random.default_rng(5)
    folder = where / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for n in CIFAR_FILES:
        folder.joinpath(n).write_bytes(content if n == name else py2_dumps(cifar_batch(rng, 4)))
    refused(["train", "--dataset", "cifar10", "--data-dir", where / "data", "--out",
             where / "run", "--no-progress"], where)


# ---------------------------------------------------------------- SVHN .mat


@st.composite
def damaged_mats(draw) -> bytes:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x, y = random_svhn(rng, 4)
    kind = draw(st.sampled_from(["truncate", "label", "count", "shape", "dtype", "missing",
                                 "bytes"]))
    if kind == "label":
        y[draw(st.integers(0, 3)), 0] = draw(st.sampled_from([0, 11, 12, 255]))
    elif kind == "count":
        y = y[:draw(st.integers(0, 3))]
    elif kind == "shape":
        x = rng.integers(0, 256, draw(st.sampled_from([(32, 32, 1, 4), (28, 28, 3, 4),
                                                      (4, 3, 32, 32), (32, 32, 3)])),
                         dtype=np.uint8)
    elif kind == "dtype":
        x = x.astype(draw(st.sampled_from([np.float64, np.int16, np.float32])))
    elif kind == "bytes":
        return draw(st.binary(max_size=300))
    buf = io.BytesIO()
    variables = {"X": x, "y": y}
    if kind == "missing":
        del variables[draw(st.sampled_from(["X", "y"]))]
    scipy.io.savemat(buf, variables)
    raw = buf.getvalue()
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    return raw


@fuzz(40)
@given(content=damaged_mats(), split=st.sampled_from(["train", "test"]))
def test_fuzz_svhn_mat(base, content, split):
    where = fresh(base[0])
    folder = where / "data"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for s in ("train", "test"):
        x, y = random_svhn(rng, 4)
        if s == split:
            (folder / f"{s}_32x32.mat").write_bytes(content)
        else:
            scipy.io.savemat(folder / f"{s}_32x32.mat", {"X": x, "y": y})
    refused(["train", "--dataset", "svhn", "--data-dir", folder, "--out", where / "run",
             "--no-progress"], where)


# ---------------------------------------------------------------- tar.gz


@pytest.fixture(scope="module")
def cifar_archive(base) -> bytes:
    src = base[0] / "archive-src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for n in CIFAR_FILES:
        (src / n).write_bytes(py2_dumps(cifar_batch(rng, 4)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return buf.getvalue()


@st.composite
def damaged_archives(draw, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "bytes", "not-tar", "missing-member"]))
    if kind == "flip":
        at = draw(st.integers(10, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "not-tar":
        return gzip.compress(draw(st.binary(max_size=600)))
    if kind == "missing-member":
        members = tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz")
        drop = draw(st.sampled_from(CIFAR_FILES))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as out:
            for m in members.getmembers():
                if not m.name.endswith("/" + drop):
                    out.addfile(m, members.extractfile(m) if m.isfile() else None)
        return buf.getvalue()
    return draw(st.binary(max_size=400))


@fuzz(40)
@given(data=st.data())
def test_fuzz_cifar_archive(base, cifar_archive, data):
    where = fresh(base[0])
    folder = where / "data"
    folder.mkdir()
    (folder / "cifar-10-python.tar.gz").write_bytes(data.draw(damaged_archives(cifar_archive)))
    refused(["train", "--dataset", "cifar10", "--data-dir", folder, "--out", where / "run",
             "--no-progress"], where)
    assert not (folder / "cifar-10-batches-py").exists()  # nothing extracted from a bad archive



# ---------------------------------------------------------------- a run someone sent you

WRITTEN = {  # a path memkern writes in a run -> the commands that write it
    ".memkern.lock": ["evaluate", "report", "grads"], ".localize.jsonl.lock": ["localize"],
    "localize.jsonl": ["localize"], "evaluate_003_own.json": ["evaluate"],
    "report/index.html": ["report"], "report": ["report"], "grads": ["grads"],
    "checkpoints": ["train"]}


def _command(name: str, run: Path) -> list:
    cpu = ["--no-progress", "--device", "cpu"]
    return {"evaluate": ["evaluate", "--run", run, "--device", "cpu"],
            "report": ["report", "--run", run],
            "grads": ["grads", "--run", run, "--epochs", "3", *cpu],
            "localize": ["localize", "--run", run, "--limit", "1", "--max-channels", "2", *cpu],
            "train": ["train", "--out", run, "--resume", "--epochs", "4", *cpu]}[name]


@fuzz(16)
@given(data=st.data(), link=st.sampled_from(sorted(WRITTEN)), dangling=st.booleans())
def test_fuzz_symlinked_files(base, data, link, dangling):
    """A link (dangling or not) where memkern writes: refused, its target untouched."""
    where = fresh(base[0])
    run, outside = where / "run", where / "outside"
    shutil.copytree(base[1], run)
    outside.mkdir()
    folder = "." not in link and "/" not in link
    target = outside / ("folder" if folder else "victim")
    if not dangling and folder:
        target.mkdir()
    elif not dangling:
        target.write_text("precious\n")
    if (run / link).is_dir():
        shutil.rmtree(run / link)
    else:
        (run / link).unlink(missing_ok=True)
    (run / link).parent.mkdir(parents=True, exist_ok=True)
    (run / link).symlink_to(target)
    refused(_command(data.draw(st.sampled_from(WRITTEN[link])), run), outside)
    assert sorted(outside.iterdir()) == ([] if dangling else [target])


def _nested(depth: int, kind: str) -> str:
    opener, closer = ("[", "]") if kind == "list" else ('{"a": ', "}")
    return opener * depth + "0" + closer * depth


@fuzz(24)
@given(depth=st.integers(33, 200_000), kind=st.sampled_from(["list", "object"]),
       where_in=st.sampled_from(["whole", "field"]),
       file=st.sampled_from(["config.json", "noise.json", "metrics.jsonl", "checkpoint"]))
def test_fuzz_deep_json(base, depth, kind, where_in, file):
    """JSON nested past the bound, as the whole file or inside a field: one line."""
    where = fresh(base[0])
    run = where / "run"
    shutil.copytree(base[1], run)
    deep = _nested(depth, kind)
    if file == "checkpoint":
        path = RunDir(run).checkpoint_path(3)
        header, data = _split_safetensors(path.read_bytes())
        config = json.loads(header["__metadata__"]["config"])
        header["__metadata__"]["config"] = deep if where_in == "whole" else \
            json.dumps(config)[:-1] + f', "model": {deep}}}'
        path.write_bytes(_join_safetensors(header, data))
        args = ["evaluate", "--run", run, "--device", "cpu"]
    else:
        text = (run / file).read_text()
        if where_in == "field":  # inside the file's (first) object
            record = text.splitlines()[0] if file.endswith(".jsonl") else text
            deep = json.dumps(json.loads(record))[:-1] + f', "z": {deep}}}'
        (run / file).write_text(deep + "\n")
        args = (["grads", "--run", run, "--no-progress", "--device", "cpu"]
                if file == "config.json" else ["report", "--run", run])
    refused(args, where)


@fuzz(20)
@given(size=st.integers(0, 2**64 - 1), extra=st.binary(max_size=16))
def test_fuzz_oversized_safetensors_header(base, checkpoint_bytes, size, extra):
    """A header length past the file's end (or any length with bytes that are no header)."""
    where = fresh(base[0])
    ckpt = where / "epoch_003.safetensors"
    if size <= len(checkpoint_bytes) - 8:
        size = len(checkpoint_bytes) + size % 2**40  # past the end
    ckpt.write_bytes(size.to_bytes(8, "little") + checkpoint_bytes[8:] + extra)
    refused(["evaluate", "--ckpt", ckpt, "--device", "cpu"], where)


@fuzz(16)
@given(shape=st.lists(st.integers(1, 2**31), min_size=3, max_size=4).filter(
    lambda s: math.prod(s) > 64), key=st.sampled_from(["x_train", "x_test"]))
def test_fuzz_oversized_npz_arrays(base, shape, key):
    """An npz array whose header claims more bytes than its member holds."""
    where = fresh(base[0])
    path = where / "data.npz"
    arrays = {"x_train": np.zeros((4, 8, 8), np.uint8), "x_test": np.zeros((2, 8, 8), np.uint8),
              "y_train": np.arange(4) % 2, "y_test": np.arange(2)}
    with zipfile.ZipFile(path, "w") as z:
        for name, array in arrays.items():
            buf = io.BytesIO()
            if name == key:
                np.lib.format.write_array_header_1_0(
                    buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
                buf.write(b"\0" * 64)
            else:
                np.save(buf, array)
            z.writestr(f"{name}.npy", buf.getvalue())
    refused(["train", "--dataset", f"npz:{path}", "--out", where / "run", "--no-progress"], where)
    assert not (where / "run").exists()


identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
received_specs = st.builds(
    lambda mod, fn, kw: f"{'.'.join(mod)}:{fn}" + (f"?{kw[0]}={kw[1]!r}" if kw else ""),
    st.lists(identifiers, min_size=1, max_size=3).filter(
        lambda m: m[0] not in ("torchvision", "timm", "memkern")),
    identifiers, st.none() | st.tuples(identifiers, json_values.filter(
        lambda v: not isinstance(v, (dict, list)))))


@fuzz(30)
@given(spec=received_specs, command=st.sampled_from(["evaluate", "grads", "localize", "train"]))
def test_fuzz_received_run_specs(base, spec, command):
    """Any package.module:factory in a run's config: refused naming it, nothing imported."""
    where = fresh(base[0])
    run = where / "run"
    shutil.copytree(base[1], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": spec}))
    for epoch in RunDir(run).epochs():
        path = RunDir(run).checkpoint_path(epoch)
        header, data = _split_safetensors(path.read_bytes())
        header["__metadata__"]["config"] = json.dumps({**config, "model": spec})
        path.write_bytes(_join_safetensors(header, data))
    modules = set(sys.modules)
    result = run_cli(*_command(command, run))
    assert_one_line_error(result)
    assert "--trust-model-code" in result.stderr or "model spec" in result.stderr, result.stderr
    top = spec.split(":")[0].split(".")[0]
    assert not [m for m in set(sys.modules) - modules if m.split(".")[0] == top]


# ---------------------------------------------------------------- cross-file edits of a run
# A run's files are checked against each other and against the run manifest: an edit of one
# field, index or byte range either refuses in one line or changes nothing of the result (an
# edit that restores the same value). The result compared is evaluate's record.

CONFIG_EDITS = {"seed": st.integers(0, MAX_SEED), "noise": st.floats(0.0, 0.99),
                "epochs": st.integers(1, 10**30), "lr": st.floats(1e-6, 10.0),
                "model": st.sampled_from(["mlp", "cnn"]), "norm": st.sampled_from(["batch", "group"]),
                "batch_size": st.integers(1, 4096), "tied_dropout": st.booleans()}


@pytest.fixture(scope="module")
def unedited(base):
    """evaluate's record on the unedited run (its path replaced: copies live elsewhere)."""
    run = Path(shutil.copytree(base[1], fresh(base[0]) / "run"))
    result = run_cli("evaluate", "--run", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return _record(run)


def _record(run: Path) -> dict:
    record = json.loads((run / "evaluate_003_own.json").read_text())
    record.pop("checkpoint")
    return record


def refused_or_same(run: Path, unedited: dict) -> None:
    before = snapshot(run)
    result = run_cli("evaluate", "--run", run, "--device", "cpu")
    if result.exit_code == 0:
        assert _record(run) == unedited
        return
    assert_one_line_error(result)
    assert_unchanged(before, run)
    assert not (run / "evaluate_003_own.json").exists()


@st.composite
def cross_file_edits(draw):
    """(file, edit) with edit(run) changing one thing of that file."""
    kind = draw(st.sampled_from(["config", "noise", "checkpoint", "manifest-less config"]))
    if kind in ("config", "manifest-less config"):
        field = draw(st.sampled_from(sorted(CONFIG_EDITS)))
        value = draw(CONFIG_EDITS[field])

        def edit(run):
            if kind == "manifest-less config":
                (run / "manifest.json").unlink()
            config = json.loads((run / "config.json").read_text())
            config[field] = value
            (run / "config.json").write_text(json.dumps(config))
        return kind, edit
    if kind == "noise":
        what = draw(st.sampled_from(["index", "cut", "num_train", "label"]))
        position = draw(st.integers(0, 10**6))
        value = draw(st.integers(-5, 2000))
        manifest = draw(st.booleans())

        def edit(run):
            if not manifest:
                (run / "manifest.json").unlink()
            noise = json.loads((run / "noise.json").read_text())
            i = position % len(noise["noisy_indices"])
            if what == "index":
                noise["noisy_indices"][i] = value
            elif what == "cut":
                for k in ("noisy_indices", "original_labels", "noisy_labels"):
                    noise[k] = noise[k][:i]
            elif what == "num_train":
                noise["num_train"] = value
            else:
                noise["noisy_labels"][i] = value
            (run / "noise.json").write_text(json.dumps(noise))
        return kind, edit
    start = draw(st.integers(0, 10**9))
    length = draw(st.integers(1, 4096))
    byte = draw(st.integers(0, 255))

    def edit(run):
        path = RunDir(run).checkpoint_path(3)
        raw = bytearray(path.read_bytes())
        at = start % len(raw)
        raw[at:at + length] = bytes([byte]) * len(raw[at:at + length])
        path.write_bytes(bytes(raw))
    return kind, edit


@fuzz(40)
@given(case=cross_file_edits())
def test_fuzz_cross_file_edits(base, unedited, case):
    _, edit = case
    run = Path(shutil.copytree(base[1], fresh(base[0]) / "run"))
    edit(run)
    refused_or_same(run, unedited)


@fuzz(20)
@given(edit=st.sampled_from(["delete", "duplicate", "swap", "epoch", "accuracy"]),
       at=st.integers(0, 2), value=st.one_of(st.floats(1.0, 1e308, exclude_min=True),
                                             st.floats(-1e308, 0.0, exclude_max=True)))
def test_fuzz_metrics_structure(base, edit, at, value):
    """Lines deleted, repeated or swapped, an epoch renumbered, an accuracy outside [0, 1]:
    report and resume refuse in one line."""
    run = Path(shutil.copytree(base[1], fresh(base[0]) / "run"))
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    if edit == "delete":
        del lines[at]
    elif edit == "duplicate":
        lines.insert(at, lines[at])
    elif edit == "swap":
        lines[at], lines[(at + 1) % 3] = lines[(at + 1) % 3], lines[at]
    else:
        row = json.loads(lines[at])
        if edit == "epoch":
            row["epoch"] = row["epoch"] + 1 + int(abs(value)) % 5
        else:
            row["noisy_acc"] = value
        lines[at] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    refused(["report", "--run", run], run)
    refused(["train", "--out", run, "--resume", "--no-progress"], run)
