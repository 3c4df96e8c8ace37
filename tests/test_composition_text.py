"""The text rows of the composition matrix (tests/test_composition.py): the byte GPT, plain and
with example-tied dropout on its MLP neurons in mode "own", through localization (greedy,
exhaustive, the exact scan) and the per-window statistics of scores, each batched path against
rows run one at a time with their own keys."""
import pytest
import torch

from memkern.experiments.localize import channel_space, greedy_localize
from memkern.experiments.localize.exhaustive import exhaustive_localize
from memkern.experiments.localize.scan import ablation_scan, naive_ablation_scan
from memkern.experiments.scores.text_signals import window_stats
from memkern.experiments.text.objective import TextObjective
from memkern.experiments.text.targets import SequenceTargets
from memkern.network.models import build_text_model
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import attach_tied_dropout, set_tied_dropout_mode

SPEC = "gpt?layers=2&width=32&heads=2&mlp=48"
SEQ = 20
SITES = ["blocks.0.mlp_hidden", "blocks.1.attn.heads", "blocks.1.mlp_hidden"]


@pytest.fixture(scope="module", params=["plain", "tied"])
def case(request):
    torch.manual_seed(0)
    model = build_text_model(SPEC, vocab=256, context=SEQ).double().eval()
    with torch.no_grad():
        model.head.weight.mul_(8.0)
    if request.param == "tied":
        attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.25,
                            p_mem=0.5, seed=3)
        set_tied_dropout_mode(model, "own")
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (9, SEQ + 1), generator=gen, dtype=torch.uint8)
    prompts = torch.randint(32, 127, (3, 6), generator=gen)
    keys = torch.tensor([100, 101, 102])
    with torch.no_grad():  # each secret is the model's own continuation under its own key
        seq = prompts
        for _ in range(5):
            with example_indices(keys):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    scored = torch.zeros(3, 10, dtype=torch.bool)
    scored[:, 5:] = True
    targets = SequenceTargets(seq, scored, keys, (0, 1, 2))
    objective = TextObjective(targets, windows, torch.tensor([0, 2, 5, 7]))
    return request.param, model, objective, windows


def test_greedy_batched_equals_one_at_a_time(case):
    variant, model, objective, _ = case
    space = channel_space(model, SITES)
    ids = torch.tensor([0, 1, 2])
    batched = greedy_localize(model, objective, ids, space=space, max_channels=4, max_rows=7)
    for r in batched:
        alone = greedy_localize(model, objective, torch.tensor([r.index]), space=space,
                                max_channels=4)[0]
        assert (r.channels, r.flipped) == (alone.channels, alone.flipped)
        assert r.trace == pytest.approx(alone.trace, rel=1e-9, abs=1e-12)
    assert any(r.channels for r in batched)


def test_scan_equals_naive_loop_and_exhaustive_takes_its_argmin(case):
    variant, model, objective, _ = case
    space = channel_space(model, SITES)
    t = torch.tensor(1)
    x, ids = objective.inputs(t[None]), objective.ids(t[None])

    def score(logits):
        return objective(logits, t.expand(len(logits)))[0]

    cand = torch.randperm(space.total, generator=torch.Generator().manual_seed(0))[:20]
    got = ablation_scan(model, x, score, sites=space, candidates=cand, ids=ids, max_rows=16)
    want = naive_ablation_scan(model, x, score, sites=space, candidates=cand, ids=ids)
    torch.testing.assert_close(got.values, want, rtol=1e-9, atol=1e-11, equal_nan=True)
    res = exhaustive_localize(model, objective, t[None], space=space, max_channels=1)[0]
    full = naive_ablation_scan(model, x, score, sites=space, ids=ids)
    assert full[space.flat(*res.channels[0])] == pytest.approx(float(full.min()), rel=1e-9)


def test_window_stats_batched_equal_rows_alone_with_their_keys(case):
    variant, model, _, windows = case
    keys = torch.arange(40, 40 + len(windows))
    got = window_stats(model, windows, keys, rows=4)
    for w in range(len(windows)):
        alone = window_stats(model, windows[w:w + 1], keys[w:w + 1])
        assert float(got.nll[w]) == pytest.approx(float(alone.nll[0]), rel=1e-9)
        assert float(got.margin[w]) == pytest.approx(float(alone.margin[0]), rel=1e-9)
    if variant == "tied":  # another key is another mask: the key reaches the sites
        other = window_stats(model, windows, keys + 1000, rows=4)
        assert not torch.allclose(other.nll, got.nll)
