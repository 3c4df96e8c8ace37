"""A run directory built by someone else (README, "Safety: opening a run someone sent you"):
nothing imported that the user did not name, nothing written outside the run, bounded reads,
and every refusal one `memkern: error:` line with exit 2 and the victim file unchanged."""
from __future__ import annotations

import io
import json
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memkern.rundir.manifest import write_recorded
from memkern.rundir.paths import RunDir

PROBE = "memkern_hostile_probe"  # a module a hostile run names; importing it leaves a marker
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A module ``PROBE`` on sys.path whose import writes ``imported.marker`` beside it."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / f"{PROBE}.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('imported.marker').write_text('imported')\n"
        "def build(**kwargs):\n    raise RuntimeError('the probe builds nothing')\n")
    monkeypatch.syspath_prepend(str(folder))
    yield folder / "imported.marker"
    sys.modules.pop(PROBE, None)


def _set_config(path: Path, **fields) -> None:
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def _set_checkpoint_config(path: Path, *, raw: str | None = None, **fields) -> None:
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    config = json.loads(meta["config"])
    config.update(fields)
    meta["config"] = raw if raw is not None else json.dumps(config)
    save_file(tensors, str(path), metadata=meta)


def hostile_run(tiny_run: Path, where: Path, **fields) -> Path:
    """A copy of the shared run whose config.json and every checkpoint say ``fields``."""
    run = where / "run"
    shutil.copytree(tiny_run, run)
    _set_config(run / "config.json", **fields)
    edited = [run / "config.json"]
    for epoch in RunDir(run).epochs():
        _set_checkpoint_config(RunDir(run).checkpoint_path(epoch), **fields)
        edited.append(RunDir(run).checkpoint_path(epoch))
    for path in edited:  # the sender records the edited files' digests: a coherent run
        write_recorded(run, path, path.read_bytes())
    return run


def commands(run: Path) -> dict[str, list]:
    cpu = ["--device", "cpu"]
    return {
        "evaluate": ["evaluate", "--run", run, *cpu],
        "evaluate --ckpt": ["evaluate", "--ckpt", RunDir(run).checkpoint_path(3), *cpu],
        "grads": ["grads", "--run", run, "--epochs", "3", "--no-progress", *cpu],
        "localize": ["localize", "--run", run, "--limit", "1", "--max-channels", "2",
                     "--no-progress", *cpu],
        "rewind": ["rewind", "--run", run, "--epochs", "0", "--no-progress", *cpu],
        "retrain": ["retrain", "--run", run, "--groups", "head", "--epochs", "1",
                    "--no-progress", *cpu],
        "scores": ["scores", "--run", run, "--compute", "--no-progress", *cpu],
        "train --resume": ["train", "--out", run, "--resume", "--epochs", "4", "--no-progress",
                           *cpu],
    }


def refused(args, *folders: Path, fragments=(), env=None):
    before = snapshot(*folders)
    assert_one_line_error(run_cli(*args, env=env), *fragments)
    assert_unchanged(before, *folders)


# ------------------------------------------------------------------ specs from files are data


@pytest.mark.parametrize("command", list(commands(Path("run"))))
def test_a_run_naming_code_imports_nothing(tiny_run, tmp_path, probe, command):
    run = hostile_run(tiny_run, tmp_path, model=f"{PROBE}:build?width=3")
    refused(commands(run)[command], tmp_path, fragments=(f"{PROBE}:build", "--trust-model-code"))
    assert PROBE not in sys.modules and not probe.exists()


@pytest.mark.parametrize("spec", [
    "logging:basicConfig?filename='{victim}'&filemode='w'",
    "os:system?command='rm {victim}'",
    "builtins:eval?source='open(\"{victim}\", \"w\")'",
    "subprocess:run?args='true'",
])
def test_stdlib_callables_named_by_a_run_are_refused(tiny_run, tmp_path, spec):
    victim = tmp_path / "notes" / "notes.txt"
    victim.parent.mkdir()
    victim.write_text("my notes\n")
    run = hostile_run(tiny_run, tmp_path, model=spec.format(victim=victim))
    for command in ("evaluate", "grads", "localize"):
        refused(commands(run)[command], tmp_path, fragments=("--trust-model-code",))
    assert victim.read_text() == "my notes\n"


def test_trust_is_given_by_the_flag_or_the_allow_list(tiny_run, tmp_path, probe):
    run = hostile_run(tiny_run, tmp_path, model=f"{PROBE}:build")
    result = run_cli(*commands(run)["evaluate"], "--trust-model-code")
    assert_one_line_error(result, "the probe builds nothing")  # imported and called: trusted
    assert probe.exists()
    probe.unlink()
    sys.modules.pop(PROBE)
    refused(commands(run)["evaluate"], tmp_path / "run")  # the flag held for one command only
    assert not probe.exists()
    for allowed in (f"{PROBE}:build", f"other:x, {PROBE}:*"):
        result = run_cli(*commands(run)["evaluate"], env={"MEMKERN_TRUSTED_FACTORIES": allowed})
        assert_one_line_error(result, "the probe builds nothing")
        assert probe.exists()
        probe.unlink()
        sys.modules.pop(PROBE)
    refused(commands(run)["evaluate"], tmp_path / "run",
            env={"MEMKERN_TRUSTED_FACTORIES": f"{PROBE}:other"})


@pytest.mark.parametrize("spec,fragment", [
    ("timm:vit_tiny_patch16_224?checkpoint_path='/tmp/w.pth'", "reads or fetches files"),
    ("timm:vit_tiny_patch16_224?pretrained_cfg_overlay='x'", "reads or fetches files"),
    ("timm:hf-hub:someone/model", "not a plain timm model name"),
    ("torchvision:resnet18?weights='DEFAULT'", "reads or fetches files"),
])
def test_zoo_specs_from_a_run_may_not_fetch(tiny_run, tmp_path, spec, fragment):
    run = hostile_run(tiny_run, tmp_path, model=spec)
    refused(commands(run)["evaluate"], tmp_path, fragments=(fragment,))


@pytest.mark.parametrize("spec,fragment", [
    ("zoo_models:tiny_net?width='6'", "not of its declared type int"),
    ("zoo_models:tiny_net?width=6.5", "not of its declared type int"),
    ("zoo_models:tiny_net?width={1: 2}", "keyword values are numbers"),
    ("zoo_models:tiny_net?width=b'6'", "keyword values are numbers"),
])
def test_spec_keywords_are_literals_of_declared_types(tmp_path, spec, fragment):
    refused(["train", "--model", spec, "--epochs", "1", "--out", tmp_path / "run"], tmp_path,
            fragments=(fragment,))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ no write leaves the run


def _link_case(run: Path, outside: Path, link: str) -> None:
    target = outside / "victim"
    (run / link).parent.mkdir(parents=True, exist_ok=True)
    if link in ("grads", "report", "checkpoints"):
        shutil.rmtree(run / link, ignore_errors=True)
        (outside / "folder").mkdir()
        target = outside / "folder"
    elif (run / link).exists():
        (run / link).unlink()
    (run / link).symlink_to(target)


@pytest.mark.parametrize("command,link", [
    ("evaluate", ".memkern.lock"), ("report", ".memkern.lock"), ("grads", ".memkern.lock"),
    ("localize", ".localize.jsonl.lock"), ("localize", "localize.jsonl"),
    ("evaluate", "evaluate_003_own.json"), ("report", "report/index.html"),
    ("report", "report"), ("grads", "grads"), ("train --resume", "checkpoints"),
    ("train --resume", "metrics.jsonl"),
])
def test_no_write_follows_a_link_out_of_the_run(tiny_run, tmp_path, command, link):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("" if link == "localize.jsonl" else "precious\n")
    _link_case(run, outside, link)
    args = {**commands(run), "report": ["report", "--run", run]}[command]
    refused(args, outside)
    assert sorted(p.name for p in outside.rglob("*")) == sorted(
        ["victim"] + (["folder"] if (outside / "folder").exists() else []))


def test_an_explicit_out_that_is_a_link_is_refused(tiny_run, tmp_path):
    victim = tmp_path / "victim.jsonl"
    victim.write_text("")
    (tmp_path / "out.jsonl").symlink_to(victim)
    refused(["localize", "--ckpt", RunDir(tiny_run).checkpoint_path(3), "--out",
             tmp_path / "out.jsonl", "--limit", "1", "--no-progress", "--device", "cpu"],
            tmp_path, fragments=("symbolic link",))


# ------------------------------------------------------------------ bounded input


@pytest.mark.parametrize("file,command", [
    ("config.json", "grads"), ("noise.json", "report"), ("metrics.jsonl", "report"),
    ("localize.jsonl", "localize"), ("localize.jsonl", "scores"), ("checkpoint", "evaluate"),
])
def test_deep_json_is_one_line(tiny_run, tmp_path, file, command):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    if file == "checkpoint":
        _set_checkpoint_config(RunDir(run).checkpoint_path(3), raw=DEEP)
    else:
        (run / file).write_text(DEEP + ("\n" if file.endswith("jsonl") else ""))
    args = {**commands(run), "report": ["report", "--run", run],
            "scores": ["scores", "--run", run, "--no-progress", "--device", "cpu"]}[command]
    refused(args, tmp_path, fragments=("levels deep",))


def test_numbers_of_a_config_have_ranges(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for field, value in (("epochs", 10**30), ("batch_size", 2**40), ("lr", 1e30),
                         ("world_size", 10**9)):
        _set_config(run / "config.json", **{field: value})
        refused(commands(run)["train --resume"], tmp_path, fragments=(field,))
        _set_config(run / "config.json", **json.loads((tiny_run / "config.json").read_text()))


@pytest.mark.parametrize("labels", ["/etc/passwd", "../labels.npy", ".hidden.npy", "a/b.npy"])
def test_files_a_run_names_stay_in_the_run(tiny_run, tmp_path, labels):
    run = hostile_run(tiny_run, tmp_path, train_labels=labels, noise=0.0, imported=True)
    refused(commands(run)["evaluate"], tmp_path, fragments=("train_labels",))


def test_a_labels_file_that_is_a_link_is_refused(tiny_run, tmp_path):
    run = hostile_run(tiny_run, tmp_path, train_labels="labels.npy", noise=0.0, imported=True)
    np.save(tmp_path / "elsewhere.npy", np.zeros(1437, dtype=np.int64))
    (run / "labels.npy").symlink_to(tmp_path / "elsewhere.npy")
    refused(commands(run)["evaluate"], tmp_path, fragments=("symbolic link",))


def test_checkpoint_header_longer_than_the_file(tiny_run, tmp_path):
    ckpt = tmp_path / "epoch_003.safetensors"
    raw = RunDir(tiny_run).checkpoint_path(3).read_bytes()
    ckpt.write_bytes((len(raw)).to_bytes(8, "little") + raw[8:])
    refused(["evaluate", "--ckpt", ckpt], tmp_path, fragments=("more than the file holds",))


@pytest.mark.parametrize("args,fragment", [
    (["--image-size", "100000"], "--image-size"),
    (["--in-channels", "1000000000"], "--in-channels"),
    (["--image-size", "4096", "--in-channels", "4096"], "choose smaller sizes"),
])
def test_sites_sizes_are_bounded(tmp_path, args, fragment):
    refused(["sites", "--model", "cnn", *args], tmp_path, fragments=(fragment,))


def _npy(shape: tuple, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + payload


def test_npz_claiming_terabytes(tmp_path):
    path = tmp_path / "huge.npz"
    small = io.BytesIO()
    np.save(small, np.zeros(4, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x_train.npy", _npy((2**40, 8, 8), b"\0" * 64))
        z.writestr("x_test.npy", _npy((4, 8, 8), b"\0" * 256))
        z.writestr("y_train.npy", small.getvalue())
        z.writestr("y_test.npy", small.getvalue())
    refused(["train", "--dataset", f"npz:{path}", "--out", tmp_path / "run"], tmp_path,
            fragments=("x_train", "claims"))
    assert not (tmp_path / "run").exists()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _image_folder(root: Path, classes: list[str]) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("L", (8, 8), 3).save(root / split / c / "a.png")


@pytest.mark.parametrize("case,fragment", [
    ("one class", "at least 2"), ("dot folders only", "no class folders"),
    ("900 megapixels", "pixels"), ("20 megapixels", "pixels"),
])
def test_image_folders_are_bounded(tmp_path, case, fragment):
    root = tmp_path / "images"
    if case == "one class":
        _image_folder(root, ["cat"])
    elif case == "dot folders only":
        _image_folder(root, [".cat", ".dog"])
    else:
        _image_folder(root, ["cat", "dog"])
        side = 30_000 if case == "900 megapixels" else 4_500
        (root / "train" / "cat" / "b.png").write_bytes(_png_header(side, side))
    refused(["train", "--dataset", f"folder:{root}", "--out", tmp_path / "run"], tmp_path,
            fragments=(fragment,))


def test_a_label_too_large_for_int64(tiny_run, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("index,label\n0,123456789012345678901234567890\n")
    refused(["import", "--weights", RunDir(tiny_run).checkpoint_path(3), "--model", "mlp",
             "--dataset", "digits", "--train-labels", labels, "--out", tmp_path / "run"],
            tmp_path, fragments=("too large",))


# ------------------------------------------------------------------ hand-edited outputs


@pytest.fixture(scope="module")
def analysed(tiny_run, tmp_path_factory):
    """The shared run with grads and a two-line localize.jsonl (copied before each edit)."""
    run = tmp_path_factory.mktemp("analysed") / "run"
    shutil.copytree(tiny_run, run)
    for args in (["grads", "--run", run, "--epochs", "3"],
                 ["localize", "--run", run, "--limit", "2", "--max-channels", "2"]):
        result = run_cli(*args, "--no-progress", "--device", "cpu")
        assert result.exit_code == 0, result.output
    return run


@pytest.mark.parametrize("index,fragment", [(10**6, "not an example"), (-1, "not an example"),
                                            ("7", "'index' is not int"),
                                            (True, "'index' is not int")])
@pytest.mark.parametrize("command", ["scores", "localize"])
def test_localize_lines_with_bad_indices(analysed, tmp_path, index, fragment, command):
    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    path = run / "localize.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["index"] = index
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = {**commands(run), "scores": ["scores", "--run", run, "--device", "cpu"]}[command]
    refused(args, tmp_path, fragments=("record 2", fragment))


@pytest.mark.parametrize("command", ["grads", "report"])
def test_a_grads_summary_missing_a_column(analysed, tmp_path, command):
    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    path = run / "grads" / "summary.csv"
    lines = [line.split(",", 1)[1] for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    args = {**commands(run), "report": ["report", "--run", run]}[command]
    refused(args, tmp_path, fragments=("lacks the column(s) epoch",))


@pytest.mark.parametrize("drop", ["epoch", "group", "cosine"])
def test_a_live_gradient_record_missing_a_field(analysed, tmp_path, drop):
    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    row = {"epoch": 1, "group": "head", "clean_norm": 1.0, "noisy_norm": 0.5, "cosine": None}
    del row[drop]
    (run / "grads" / "live.jsonl").write_text(json.dumps(row) + "\n")
    refused(commands(run)["grads"], tmp_path, fragments=("live.jsonl, record 1", drop))


def test_a_grads_summary_missing_a_row_still_plots(analysed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    path = run / "grads" / "summary.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # one (epoch, group) cell gone: a gap
    result = run_cli(*commands(run)["grads"])
    assert result.exit_code == 0, result.output
