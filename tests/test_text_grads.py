"""Gradient accounting of text runs: per-window gradient norms (loss = a window's mean next-byte
NLL) in every mode equal a one-window-at-a-time autograd loop, tied-dropout windows keyed by their
mask keys; `memkern grads` on a tiny text run writes its summary and per-window files, resumes,
and refuses bad input with one line."""
import csv

import pytest
import torch
import torch.nn.functional as F
from cli_checks import assert_one_line_error, run_cli
from test_text_data import write_works
from test_text_train import TINY, tiny_args

import memkern.experiments.gradients.accounting as accounting_module
from memkern.experiments.gradients.norms import per_example_grad_norms
from memkern.experiments.gradients.norms.ghost import statically_unsupported
from memkern.network.models.gpt import build_gpt
from memkern.network.models.groups import layer_groups
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import attach_tied_dropout
from memkern.rundir.context import open_run


def window_norms_one_at_a_time(model, tokens, targets, keys, groups):
    """Each window alone: autograd of its mean next-byte NLL, per group norms."""
    names = [n for n, _ in model.named_parameters()]
    out = torch.zeros(len(tokens), len(groups), dtype=torch.float64)
    for b in range(len(tokens)):
        with example_indices(None if keys is None else keys[b:b + 1]):
            loss = F.cross_entropy(model(tokens[b:b + 1])[0], targets[b])
        grads = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))
        for i, g in enumerate(groups):
            out[b, i] = sum(grads[n].square().sum() for n in g.param_names).sqrt()
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["auto", "ghost", "func", "loop"])
def test_window_norms_equal_a_window_at_a_time_loop(mode, tied):
    torch.manual_seed(3 + tied)
    model = build_gpt(TINY, vocab=256, context=12).double().eval()
    keys = None
    if tied:
        attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.3,
                            p_mem=0.2, seed=5)
        keys = torch.tensor([0, 9, 9, 3, 1, 9])  # windows 1, 2 and 5 share one insert's mask
    # few distinct tokens, so a window repeats tokens (the embedding rule adds their rows)
    tokens = torch.randint(0, 6, (6, 12))
    targets = torch.randint(0, 256, (6, 12))
    groups = layer_groups(model)
    got = per_example_grad_norms(model, tokens, targets, ids=keys, mode=mode, groups=groups)
    want = window_norms_one_at_a_time(model, tokens, targets, keys, groups)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if tied:  # the key reaches the masks: another key gives another gradient
        other = per_example_grad_norms(model, tokens, targets, ids=keys + 1, mode=mode,
                                       groups=groups)
        assert not torch.allclose(other, want)


def test_auto_mode_is_all_ghost_on_the_gpt():
    model = build_gpt(TINY, vocab=256, context=8)
    assert statically_unsupported(model) == []


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_grads")
    corpus = write_works(root / "c", count=5, lines=40)
    result = run_cli(*tiny_args(corpus, root / "run", "--epochs", "2", "--tied-dropout"))
    assert result.exit_code == 0, result.output
    return root / "run"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grads_on_a_text_run_writes_resumes_and_matches_autograd(text_run, monkeypatch):
    seen = []
    norms = accounting_module.per_example_grad_norms

    def recording(model, x, y, *, ids, **kwargs):
        seen.append(ids.cpu())
        return norms(model, x, y, ids=ids, **kwargs)

    monkeypatch.setattr(accounting_module, "per_example_grad_norms", recording)
    result = run_cli("grads", "--run", text_run, "--epochs", "2", "--batch-size", "64",
                     "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert ("summed gradients of the clean and the planted (noisy) windows at epoch 2"
            in result.output)
    out = text_run / "grads"
    for name in ("summary.csv", "per_example_epoch_002.csv", "summed_norms.png", "cosine.png"):
        assert (out / name).stat().st_size > 0, name
    ctx = open_run(text_run, epoch=2, device="cpu", text_ok=True)
    data, model = ctx.data, ctx.model.double().eval()
    assert torch.equal(torch.cat(seen), data.mask_keys)  # tied masks: every copy keyed alike
    groups = [g.name for g in layer_groups(model)]
    rows = _rows(out / "per_example_epoch_002.csv")
    assert list(rows[0]) == ["index", "noisy", "insert", *groups, "total"]
    assert [int(r["insert"]) for r in rows] == data.owner.tolist()
    assert [r["noisy"] == "1" for r in rows] == data.noisy_mask.tolist()
    # per-window norms are those of a window-at-a-time loop on the checkpoint
    some = torch.cat([torch.nonzero(data.noisy_mask).flatten()[:2], torch.tensor([0, 5])])
    want = window_norms_one_at_a_time(model, data.train_images[some], data.train_labels[some],
                      data.mask_keys[some], layer_groups(model))
    got = torch.tensor([[float(rows[i][g]) for g in groups] for i in some.tolist()],
                       dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-7)
    # the summed planted and clean gradients: (1/W) sum of the split's mean NLLs, as in training
    w = len(data.owner)
    params = list(model.parameters())
    with example_indices(data.mask_keys):
        nll = F.cross_entropy(model(data.train_images).transpose(1, 2), data.train_labels,
                              reduction="none").mean(1)
    planted, clean = (torch.autograd.grad(nll[m].sum() / w, params, retain_graph=True)
                      for m in (data.noisy_mask, ~data.noisy_mask))
    total = {r["group"]: r for r in _rows(out / "summary.csv")}["total"]
    norm = lambda gs: float(torch.cat([g.flatten() for g in gs]).norm())  # noqa: E731
    cosine = float(sum((a * b).sum() for a, b in zip(planted, clean))) / norm(planted) / norm(clean)
    assert float(total["noisy_norm"]) == pytest.approx(norm(planted), rel=1e-4)
    assert float(total["clean_norm"]) == pytest.approx(norm(clean), rel=1e-4)
    assert float(total["cosine"]) == pytest.approx(cosine, rel=1e-3, abs=1e-5)
    planted_totals = torch.tensor([float(r["total"]) for r in rows if r["noisy"] == "1"])
    assert float(total["noisy_mean"]) == pytest.approx(float(planted_totals.mean()), rel=1e-4)
    # a rerun skips the complete epoch and accounts only the new one
    before = (out / "per_example_epoch_002.csv").stat().st_mtime_ns
    seen.clear()
    result = run_cli("grads", "--run", text_run, "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (out / "per_example_epoch_002.csv").stat().st_mtime_ns == before
    assert sorted({r["epoch"] for r in _rows(out / "summary.csv")}) == ["0", "1", "2"]
    assert len(torch.cat(seen)) == 2 * w  # epochs 0 and 1 only
    # the report shows the accounting in the words of a text run
    assert run_cli("report", "--run", text_run).exit_code == 0
    page = (text_run / "report" / "index.html").read_text()
    assert "planted windows&#39; summed gradient" in page and "no gradient accounting" not in page


@pytest.mark.parametrize("args,fragment", [
    (["--batch-size", "0"], "batch size"),
    (["--epochs", "9"], "no checkpoint for epoch 9"),
])
def test_bad_grads_input_on_a_text_run_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    assert run_cli(*tiny_args(corpus, tmp_path / "run")).exit_code == 0
    result = run_cli("grads", "--run", tmp_path / "run", *args, "--no-progress",
                     "--device", "cpu")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run" / "grads").exists()
