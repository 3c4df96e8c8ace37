"""`hf:gpt2`: a transformers GPT-2 built from a config, through the native GPT's sites. Its
logits equal transformers' own GPT2LMHeadModel with the same weights; a zeroed head or neuron
equals zeroing the c_proj weights that read it; per-window gradient norms (ghost, with the Conv1D
rule) equal a window-at-a-time autograd loop in float64; greedy localization flips exactly what a
weight edit removes; a text run trains (tied dropout included), reloads, and lists its sites.
Skipped where transformers is not installed, except the test that its absence is one line."""
import json
import sys

import pytest
import torch
from cli_checks import assert_one_line_error, run_cli
from test_text_data import write_works
from test_text_grads import window_norms_one_at_a_time

from memkern.errors import CheckpointError, ConfigError
from memkern.experiments.gradients.norms import per_example_grad_norms
from memkern.experiments.gradients.norms.ghost import statically_unsupported
from memkern.experiments.localize.channels import channel_space, row_masks, set_masks
from memkern.experiments.localize.greedy import greedy_localize
from memkern.experiments.text.extraction import extracted, greedy_continuations
from memkern.experiments.text.objective import TextObjective
from memkern.experiments.text.targets import SequenceTargets
from memkern.network.models import build_text_model, layer_groups
from memkern.network.models.hf_gpt2 import hf_gpt2_settings
from memkern.network.models.trust import check_file_spec
from memkern.network.sites import channel_sites, example_indices
from memkern.network.tied_dropout import attach_tied_dropout, set_tied_dropout_mode
from memkern.rundir.context import open_run
from memkern.training.checkpoints import load_checkpoint, load_model_state
from memkern.training.config import TrainConfig

SPEC = "hf:gpt2?n_layer=2&n_embd=32&n_head=2"
NATIVE = "gpt?layers=1&width=32&heads=2&mlp=64"
SEQ = 24


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def tiny(seed, context=SEQ, spec=SPEC):
    torch.manual_seed(seed)
    return build_text_model(spec, vocab=256, context=context).double().eval()


def hf_reference(transformers, model):
    """transformers' GPT2LMHeadModel of ``model``'s config, holding ``model``'s weights."""
    config = transformers.GPT2Config(vocab_size=256, n_positions=model.context, n_layer=2,
                                     n_embd=32, n_head=2, tie_word_embeddings=False,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ref = transformers.GPT2LMHeadModel(config).double().eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def test_logits_equal_transformers_own_model_under_all_ones_masks(transformers):
    model = tiny(0)
    ref = hf_reference(transformers, model)
    tokens = torch.randint(0, 256, (3, SEQ))
    want = ref(tokens).logits
    space = channel_space(model, list(channel_sites(model)))
    with torch.no_grad(), row_masks(model, space) as ops:
        set_masks(ops, space, torch.ones(3, space.total, dtype=torch.float64))
        assert torch.equal(model(tokens), want)
    assert torch.equal(model(tokens), want)  # the masks are gone again


@pytest.mark.parametrize("site,channel", [("transformer.h.0.attn.heads", 1),
                                          ("transformer.h.1.attn.heads", 0),
                                          ("transformer.h.0.mlp.hidden", 77)])
def test_a_zeroed_channel_is_its_c_proj_rows_zeroed(transformers, site, channel):
    model = tiny(1)
    ref = hf_reference(transformers, model)
    block = ref.transformer.h[int(site.split(".")[2])]
    width = 16 if site.endswith("heads") else 1  # a head's output spans head_dim inputs
    proj = block.attn.c_proj if site.endswith("heads") else block.mlp.c_proj
    with torch.no_grad():
        proj.weight[channel * width:(channel + 1) * width] = 0.0  # Conv1D weight: [in, out]
    tokens = torch.randint(0, 256, (2, SEQ))
    space = channel_space(model, [site])
    mask = torch.ones(2, space.total, dtype=torch.float64)
    mask[:, channel] = 0.0
    with torch.no_grad(), row_masks(model, space) as ops:
        set_masks(ops, space, mask)
        torch.testing.assert_close(model(tokens), ref(tokens).logits, rtol=1e-12, atol=1e-12)


def test_settings_are_config_fields_of_fixed_kinds():
    s = hf_gpt2_settings("hf:gpt2?n_layer=3&n_inner=48&activation_function=relu")
    assert (s["n_layer"], s["n_inner"], s["activation_function"]) == (3, 48, "relu")
    assert s["resid_pdrop"] == s["embd_pdrop"] == s["attn_pdrop"] == 0.0 and s["n_embd"] == 256
    check_file_spec("hf:gpt2?n_layer=2", source="config.json")  # data: no trust needed
    with pytest.raises(ConfigError, match="reads text"):
        TrainConfig(dataset="digits", model=SPEC)
    for spec, words in [("hf:gpt2?n_layers=2", "unknown keyword 'n_layers'"),
                        ("hf:gpt2?n_positions=64", "--seq-len"),
                        ("hf:gpt2?vocab_size=300", "byte vocabulary"),
                        ("hf:gpt2?activation_function=os.system", "must be one of"),
                        ("hf:gpt2?n_embd=30&n_head=4", "multiple of n_head"),
                        ("hf:gpt2?attn_pdrop=1.5", "probability"),
                        ("hf:gpt2?n_layer=0", "positive integer"),
                        ("hf:llama?n_layer=2", "gpt2 only")]:
        with pytest.raises(ConfigError) as e:
            hf_gpt2_settings(spec)
        assert words in str(e.value), (spec, str(e.value))
        with pytest.raises(ConfigError):
            check_file_spec(spec, source="config.json")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["ghost", "auto"])
def test_window_norms_equal_a_window_at_a_time_loop(transformers, mode, tied):
    model = tiny(2 + tied, context=12)
    assert statically_unsupported(model) == []  # Conv1D, LayerNorm, Embedding: all ruled
    keys = None
    if tied:
        attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.3,
                            p_mem=0.2, seed=5)
        keys = torch.tensor([0, 9, 9, 3, 1])
    tokens = torch.randint(0, 6, (5, 12))  # repeated tokens: the embedding rule adds rows
    targets = torch.randint(0, 256, (5, 12))
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["transformer.wte", "transformer.h.0", "transformer.h.1",
                                        "transformer.ln_f"]
    got = per_example_grad_norms(model, tokens, targets, ids=keys, mode=mode, groups=groups)
    want = window_norms_one_at_a_time(model, tokens, targets, keys, groups)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_greedy_flips_exactly_what_a_weight_edit_removes(transformers):
    model = tiny(3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked model: its own continuations are confident
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randint(32, 127, (3, 6), generator=gen)
    secrets = greedy_continuations(model, prompts, 5)
    scored = torch.zeros(3, 10, dtype=torch.bool)
    scored[:, 5:] = True
    targets = SequenceTargets(torch.cat([prompts, secrets], 1), scored,
                              torch.arange(1000, 1003), (0, 1, 2))
    clean = torch.randint(0, 256, (10, SEQ + 1), generator=gen, dtype=torch.uint8)
    objective = TextObjective(targets, clean, torch.tensor([0, 3, 5, 8]))
    space = channel_space(model, ["transformer.h.0.attn.heads", "transformer.h.1.mlp.hidden"])
    results = greedy_localize(model, objective, torch.arange(3), space=space, max_channels=12)
    for t, res in enumerate(results):
        edited = tiny(3)
        edited.load_state_dict(model.state_dict())
        with torch.no_grad():
            for flat in torch.nonzero(res.zeroed).flatten().tolist():
                site, c = space.locate(flat)
                block = edited.transformer.h[int(site.split(".")[2])]
                if site.endswith("heads"):
                    block.attn.c_proj.weight[c * 16:(c + 1) * 16] = 0.0
                else:
                    block.mlp.c_proj.weight[c] = 0.0
        assert res.flipped == (not bool(extracted(edited, prompts[t][None], secrets[t][None])[0]))
    assert any(r.flipped for r in results)


@pytest.fixture(scope="module")
def hf_run(transformers, tmp_path_factory):
    root = tmp_path_factory.mktemp("hfrun")
    corpus = write_works(root / "c", count=5, lines=40)
    result = run_cli("train", "--dataset", f"text:{corpus}", "--model", SPEC, "--seq-len", "32",
                     "--canaries", "4", "--canary-reps", "1,8", "--epochs", "1",
                     "--batch-size", "32", "--tied-dropout", "--out", root / "run",
                     "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root / "run"


def test_a_tied_run_trains_reloads_and_keeps_or_drops_its_neurons(transformers, hf_run):
    line = json.loads((hf_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"extracted_r8_keep", "extracted_r8_drop", "heldout_bpb_drop"} <= set(line)
    ctx = open_run(hf_run, device="cpu", text_ok=True)
    assert ctx.config.model == SPEC and type(ctx.model).__name__ == "HFGPT2"
    saved = load_checkpoint(hf_run / "checkpoints" / "epoch_001.safetensors").model_state
    for name, tensor in ctx.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    rows = ctx.data.train_windows[:4, :-1].long()
    with torch.no_grad(), example_indices(torch.arange(4)):
        set_tied_dropout_mode(ctx.model, "keep")
        kept = ctx.model(rows)
        set_tied_dropout_mode(ctx.model, "drop")
        dropped = ctx.model(rows)
    assert not torch.allclose(kept, dropped)


def test_grads_and_sites_cli_on_an_hf_run(transformers, hf_run):
    result = run_cli("grads", "--run", hf_run, "--epochs", "1", "--no-progress",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "transformer.h.1" in result.output
    listed = run_cli("sites", "--model", SPEC, "--seq-len", "32")
    assert listed.exit_code == 0, listed.output
    for name in ("transformer.h.0.attn.heads", "transformer.h.1.mlp.hidden", "128 channels"):
        assert name in listed.output


def test_a_native_gpt_checkpoint_does_not_load_into_hf_gpt2(transformers, tmp_path):
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    native = tmp_path / "native"
    assert run_cli("train", "--dataset", f"text:{corpus}", "--model", NATIVE, "--seq-len", "32",
                   "--epochs", "1", "--batch-size", "64", "--out", native, "--no-progress",
                   "--device", "cpu").exit_code == 0
    ckpt = load_checkpoint(native / "checkpoints" / "epoch_001.safetensors")
    with pytest.raises(CheckpointError, match="does not fit the HFGPT2 model"):
        load_model_state(tiny(0, context=32).float(), ckpt)
    assert_one_line_error(run_cli("train", "--out", native, "--resume", "--model", SPEC,
                                  "--no-progress"), "model")


def test_without_transformers_an_hf_run_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # find_spec then answers None
    corpus = write_works(tmp_path / "c", count=5, lines=40)
    result = run_cli("train", "--dataset", f"text:{corpus}", "--model", SPEC, "--seq-len", "32",
                     "--epochs", "1", "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(result, "needs transformers", "memkern[hf]")
    assert not (tmp_path / "run").exists()
