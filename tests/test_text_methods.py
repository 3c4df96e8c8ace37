"""Neuron-localization methods for memorized sequences: each against a slow, obvious reference
written from its definition (weights edited, forward hooks, one target at a time), on memkern's
GPT and on hf:gpt2 (a transformers GPT-2; skipped without transformers), and a planted neuron
that the methods must find first."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import channel_space
from memkern.experiments.text.methods import (
    METHODS, balanced_subnet, hard_concrete, integrated_gradients, slimming,
)
from memkern.experiments.text.methods.common import start_block
from memkern.experiments.text.methods.learned_masks import WINDOWS, clean_choice
from memkern.experiments.text.targets import SequenceTargets
from memkern.network.models import build_text_model
from memkern.network.sites import channel_sites, example_indices
from memkern.experiments.localize.channels import attached, row_masks, set_masks
from memkern.experiments.localize.greedy import greedy_localize
from memkern.experiments.text.objective import TextObjective
from memkern.network.tied_dropout import (
    attach_tied_dropout, set_tied_dropout_mode, unindexed_rows,
)

SPEC = "gpt?layers=2&width=32&heads=2&mlp=64"
HF = "hf:gpt2?n_layer=2&n_embd=32&n_head=2&n_inner=64"  # the same sizes, transformers' blocks
MODELS = [(SPEC, False), (SPEC, True), (HF, False), (HF, True)]  # (spec, tied)
CONTEXT = 24
Z = ord("Z")


def tiny_model(seed: int = 0, tied: bool = False, spec: str = SPEC):
    """``tied``: example-tied dropout on the MLP neurons in mode "own", so every target row
    must carry its key (and clean rows none) for the references and methods to agree."""
    if spec == HF:
        pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = build_text_model(spec, vocab=256, context=CONTEXT).double().eval()
    with torch.no_grad():  # peaked predictions: NLLs that channels can move
        (model.lm_head if spec == HF else model.head).weight.mul_(8.0)
    if tied:
        attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.5,
                            p_mem=0.25, seed=1)
        set_tied_dropout_mode(model, "own")
    return model


def make_targets(rows: list[tuple[bytes, bytes]]) -> SequenceTargets:
    width = max(len(p) + len(s) for p, s in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for t, (p, s) in enumerate(rows):
        tokens[t, :len(p) + len(s)] = torch.tensor(list(p + s))
        scored[t, len(p) - 1:len(p) + len(s) - 1] = True
    return SequenceTargets(tokens, scored, torch.arange(len(rows)) * 7 + 3,
                           tuple(range(40, 40 + len(rows))))


def random_targets(seed: int = 1) -> SequenceTargets:
    gen = torch.Generator().manual_seed(seed)

    def text(n):
        return bytes(torch.randint(32, 127, (n,), generator=gen).tolist())

    return make_targets([(text(7), text(8)), (text(5), text(6)), (text(9), text(4))])


def clean_windows(n: int = 5, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (n, 13), generator=gen, dtype=torch.uint8)
    return torch.where(w == Z, ord("a"), w)


def all_sites(model):
    return channel_space(model, list(channel_sites(model)))


def nll_of(model, targets):
    with torch.no_grad(), example_indices(targets.keys):
        return targets.secret_nll(model(targets.inputs()))


def sites_called(model):
    """An identity op on every site: hf:gpt2 skips a site that holds no op, and the forward
    hooks of the references below would not fire."""
    return attached(model, {n: torch.nn.Identity() for n in channel_sites(model)})


def flat_channels(space):
    """(site name, channel) of each flat channel."""
    return [(name, c) for name, count in zip(space.names, space.counts) for c in range(count)]


@pytest.mark.parametrize("spec, tied", MODELS[:3])
def test_every_method_gives_one_row_per_target_and_leaves_the_model_as_it_was(spec, tied):
    model, targets, clean = tiny_model(tied=tied, spec=spec), random_targets(), clean_windows()
    space = all_sites(model)
    before = copy.deepcopy(model.state_dict())

    def held():  # each site's ops, and each op's tied-dropout mode if it has one
        return {n: [(id(op), getattr(op, "mode", None)) for op in site.ops]
                for n, site in channel_sites(model).items()}

    ops_before = held()
    assert space.total == 2 * 64 + 2 * 2
    for name, method in METHODS.items():
        if tied and name == "greedy":  # its references carry no keys of their own
            with pytest.raises(ConfigError, match="tied dropout"):
                method(model, space, targets, clean, seed=0)
            continue
        scores = method(model, space, targets, clean, seed=0)
        assert scores.shape == (3, space.total) and scores.is_floating_point(), name
        assert torch.isfinite(scores).all(), name
        assert held() == ops_before, name
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), name
        assert all(p.grad is None for p in model.parameters()), name
        # The same under no_grad with the weights frozen, and they stay frozen.
        model.requires_grad_(False)
        with torch.no_grad():
            again = method(model, space, targets, clean, seed=0)
        assert not any(p.requires_grad for p in model.parameters()), name
        model.requires_grad_(True)
        torch.testing.assert_close(again, scores, rtol=1e-12, atol=1e-12, msg=name)
        none = targets.subset(torch.zeros(0, dtype=torch.long))
        assert method(model, space, none, clean, seed=0).shape == (0, space.total), name


def zero_output_weights(model, name, c):
    """Channel c of site ``name`` removed from the weights reading it, written out per layout:
    nn.Linear weights are [out, in]; hf:gpt2's Conv1D weights are [in, out]."""
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    hd = 32 // 2
    with torch.no_grad():
        if name.endswith("mlp_hidden"):
            owner.fc2.weight[:, c] = 0
        elif name.endswith("mlp.hidden"):
            owner.c_proj.weight[c] = 0
        elif hasattr(owner, "proj"):  # the head's output columns of the attention projection
            owner.proj.weight[:, c * hd:(c + 1) * hd] = 0
        else:  # the head's input rows of hf's c_proj
            owner.c_proj.weight[c * hd:(c + 1) * hd] = 0


@pytest.mark.parametrize("spec, tied", MODELS)
def test_the_block_stack_computes_the_forward(spec, tied):
    model, targets = tiny_model(tied=tied, spec=spec), random_targets()
    x, keys = targets.inputs(), targets.keys
    with torch.no_grad(), example_indices(keys):
        want = model(x)
        assert torch.equal(model.readout(model.run_blocks(model.embed(x))), want)
        mid = model.run_blocks(model.embed(x), 0, 1)
        torch.testing.assert_close(model.readout(model.run_blocks(mid, 1)), want, rtol=1e-12,
                                   atol=1e-12)
    assert [start_block(model, n) for n in channel_sites(model)] == [0, 0, 1, 1]


@pytest.mark.parametrize("spec, tied", MODELS)
def test_zero_out_equals_removing_each_channel_from_the_weights(spec, tied):
    model, targets = tiny_model(tied=tied, spec=spec), random_targets()
    space = all_sites(model)
    got = METHODS["zero_out"](model, space, targets, clean_windows(), rows=37)
    base = nll_of(model, targets)
    for flat, (name, c) in enumerate(flat_channels(space)):
        edited = copy.deepcopy(model)
        zero_output_weights(edited, name, c)
        torch.testing.assert_close(got[:, flat], nll_of(edited, targets) - base,
                                   rtol=1e-9, atol=1e-9)


def hooked_abs_means(model, space, inputs, keys):
    """Per site, mean |output| over each channel's elements per position: [N, P, C]; rows
    without keys run with tied dropout in "keep"."""
    seen = {}
    hooks = [channel_sites(model)[n].register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, o.abs() if o.dim() == 3
                                               else o.abs().mean(-1).transpose(1, 2)))
        for n in space.names]
    with torch.no_grad(), example_indices(keys), sites_called(model), \
            (unindexed_rows(model) if keys is None else contextlib.nullcontext()):
        model(inputs)
    for h in hooks:
        h.remove()
    return torch.cat([seen[n] for n in space.names], dim=-1)


@pytest.mark.parametrize("spec, tied", MODELS[:3])
def test_activations_equal_forward_hook_means(spec, tied):
    model, targets, clean = tiny_model(tied=tied, spec=spec), random_targets(), clean_windows()
    space = all_sites(model)
    got = METHODS["activations"](model, space, targets, clean, rows=2)
    on_t = hooked_abs_means(model, space, targets.inputs(), targets.keys)
    on_c = hooked_abs_means(model, space, clean.long()[:, :-1], None).flatten(0, 1).mean(0)
    for t in range(len(targets)):
        want = on_t[t][targets.scored[t]].mean(0) - on_c
        torch.testing.assert_close(got[t], want, rtol=1e-9, atol=1e-12)


def scaled_ll(model, space, targets, t, site, alpha):
    """Secret log-likelihood of target t with the channels of ``site`` scaled by ``alpha`` [C]
    (a forward hook), tied keys passed as the method passes them."""
    dim = channel_sites(model)[site].channel_dim
    shape = (1, 1, -1) if dim == -1 else (1, -1, 1, 1)
    hook = channel_sites(model)[site].register_forward_hook(lambda m, i, o: o * alpha.view(shape))
    row = targets.subset(torch.tensor([t]))
    with example_indices(row.keys), sites_called(model):
        ll = -row.secret_nll(model(row.inputs()))[0]
    hook.remove()
    return ll


@pytest.mark.parametrize("spec, tied", MODELS)
def test_integrated_gradients_equal_a_per_step_loop_and_are_complete(spec, tied):
    model, targets = tiny_model(tied=tied, spec=spec), random_targets()
    space = all_sites(model)
    steps = 20
    got = integrated_gradients.rank(model, space, targets, clean_windows(), steps=steps, rows=50)
    for t in (0, 2):
        for name, off, count in zip(space.names, space.offsets, space.counts):
            want = torch.zeros(count, dtype=torch.float64)
            for k in range(steps):
                alpha = torch.full((count,), (k + 0.5) / steps, dtype=torch.float64,
                                   requires_grad=True)
                want += torch.autograd.grad(scaled_ll(model, space, targets, t, name, alpha),
                                            alpha)[0] / steps
            torch.testing.assert_close(got[t, off:off + count], want, rtol=1e-7, atol=1e-9)
            with torch.no_grad():
                f1 = scaled_ll(model, space, targets, t, name, torch.ones(count).double())
                f0 = scaled_ll(model, space, targets, t, name, torch.zeros(count).double())
            # Midpoint rule, 20 steps: within 2% of the path's total change.
            assert abs(float(got[t, off:off + count].sum() - (f1 - f0))) <= \
                0.02 * abs(float(f1 - f0)) + 1e-6, (t, name)


def owned_grads(owner, name, c, hd=16, width=32):
    """The gradients of every weight channel c of site ``name`` owns, per layout."""
    if name.endswith("mlp_hidden"):
        return [owner.fc1.weight.grad[c], owner.fc1.bias.grad[c:c + 1],
                owner.fc2.weight.grad[:, c]]
    if name.endswith("mlp.hidden"):  # Conv1D weights [in, out]
        return [owner.c_fc.weight.grad[:, c], owner.c_fc.bias.grad[c:c + 1],
                owner.c_proj.weight.grad[c]]
    rows = [slice(p * width + c * hd, p * width + (c + 1) * hd) for p in range(3)]
    if hasattr(owner, "qkv"):
        return ([owner.qkv.weight.grad[r] for r in rows] + [owner.qkv.bias.grad[r] for r in rows]
                + [owner.proj.weight.grad[:, c * hd:(c + 1) * hd]])
    return ([owner.c_attn.weight.grad[:, r] for r in rows]
            + [owner.c_attn.bias.grad[r] for r in rows]
            + [owner.c_proj.weight.grad[c * hd:(c + 1) * hd]])


@pytest.mark.parametrize("spec, tied", MODELS[:3])
def test_gradient_magnitude_equals_autograd_on_the_parameters(spec, tied):
    model, targets = tiny_model(tied=tied, spec=spec), random_targets()
    space = all_sites(model)
    got = METHODS["gradient_magnitude"](model, space, targets, clean_windows())
    for t in range(len(targets)):
        model.zero_grad()
        row = targets.subset(torch.tensor([t]))
        with example_indices(row.keys):
            row.secret_nll(model(row.inputs())).sum().backward()
        for flat, (name, c) in enumerate(flat_channels(space)):
            parts = owned_grads(model.get_submodule(name.rsplit(".", 1)[0]), name, c)
            want = sum(p.abs().sum() for p in parts)
            torch.testing.assert_close(got[t, flat], want, rtol=1e-9, atol=1e-12)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("spec", [SPEC, HF])
def test_greedy_ranks_its_zeroed_channels_first_then_by_the_first_gradient(spec):
    model = tiny_model(3, spec=spec)
    targets, clean = random_targets(4), clean_windows(6)
    # Targets the model has memorized: each secret is its own greedy continuation.
    prompts = targets.tokens[:, :5]
    with torch.no_grad(), example_indices(targets.keys):
        seq = prompts
        for _ in range(4):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    targets = make_targets([(bytes(p.tolist()), bytes(s.tolist()))
                            for p, s in zip(prompts, seq[:, 5:])])
    space = channel_space(model, list(model.default_dropout_sites))  # the MLP neurons
    scores = METHODS["greedy"](model, space, targets, clean, max_channels=6)
    objective = TextObjective(targets, clean, torch.arange(len(clean)))
    ids = torch.tensor(targets.ids)
    found = greedy_localize(model, objective, ids, space=space, max_channels=6)
    for row, res in zip(scores, found):
        order = row.argsort(descending=True)
        chosen = [space.flat(s, c) for s, c in res.channels]
        assert order[:len(chosen)].tolist() == chosen
        assert len(chosen) >= 1
    # The rest follow dL/dm at m = 1: compare with finite differences of the objective.
    t = ids[:1]
    with torch.no_grad():
        base = float(objective(model(objective.inputs(t))[None], t)[0][0])
    rest = [c for c in scores[0].argsort(descending=True).tolist()
            if c not in {space.flat(s, k) for s, k in found[0].channels}][:3]
    for c in rest:
        with row_masks(model, space) as ops:
            m = torch.ones(len(objective.inputs(t)), space.total, dtype=torch.float64)
            m[:, c] = 1.0 - 1e-6
            set_masks(ops, space, m)
            with example_indices(objective.ids(t)), torch.no_grad():
                moved = float(objective(model(objective.inputs(t))[None], t)[0][0])
        assert float(scores[0, c]) == pytest.approx((base - moved) / 1e-6, rel=1e-3, abs=1e-6)


def test_random_is_seeded():
    model, targets, clean = tiny_model(), random_targets(), clean_windows()
    space = all_sites(model)
    a = METHODS["random"](model, space, targets, clean, seed=4)
    assert torch.equal(a, METHODS["random"](model, space, targets, clean, seed=4))
    assert not torch.equal(a, METHODS["random"](model, space, targets, clean, seed=5))
    assert a.shape == (3, space.total) and ((a >= 0) & (a < 1)).all()


def reference_learning(model, space, targets, clean, t, *, theta0, gate, penalty, project,
                       steps, lr, seed):
    """One target, masks applied by forward hooks that multiply each site's output; each step
    moves the most-pulled parameter of every site by lr (plus the penalty's gradient)."""
    ref = clean_choice(clean, WINDOWS, seed=seed)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + targets.ids[t])
    theta = theta0.clone().double().requires_grad_(True)
    row = targets.subset(torch.tensor([t]))
    sites = channel_sites(model)

    def clean_ce():
        with unindexed_rows(model):
            logits = model(ref[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), ref[:, 1:])

    for _ in range(steps):
        mask = gate(theta, gen)
        hooks = []
        for name, off, count in zip(space.names, space.offsets, space.counts):
            shape = (1, 1, -1) if sites[name].channel_dim == -1 else (1, -1, 1, 1)
            m = mask[off:off + count].view(shape)
            hooks.append(sites[name].register_forward_hook(lambda mod, i, o, m=m: o * m))
        with example_indices(row.keys), sites_called(model):
            forget = -row.secret_nll(model(row.inputs()))[0] / row.scored.sum()
            keep = clean_ce()
        for h in hooks:
            h.remove()
        g, = torch.autograd.grad(forget + keep, theta)
        # a site whose gates all sit clipped has no gradient at all: it stays put
        step = torch.cat([g[off:off + count] / g[off:off + count].abs().max().clamp_min(1e-30)
                          for off, count in zip(space.offsets, space.counts)])
        if penalty is not None:
            step = step + torch.autograd.grad(penalty(theta), theta)[0]
        with torch.no_grad():
            theta -= lr * step
            project(theta)
    return theta.detach()


def hard_concrete_draw(log_alpha, gen):
    u = torch.rand(len(log_alpha), generator=gen, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u / (1 - u)) + log_alpha) / (2 / 3))
    return torch.clamp(s * 1.2 - 0.1, 0, 1)


def lowest_dropped(space, drop):
    def gate(s, gen):
        hard = torch.ones_like(s)
        for off, count in zip(space.offsets, space.counts):
            k = max(1, round(drop * count))
            hard[off + torch.argsort(s[off:off + count].detach())[:k]] = 0
        return hard + s - s.detach()
    return gate


@pytest.mark.parametrize("spec, tied", MODELS[:3])
@pytest.mark.parametrize("name", ["slimming", "hard_concrete", "balanced_subnet"])
def test_learned_masks_equal_one_target_at_a_time_with_hooks(name, spec, tied):
    model, targets, clean = tiny_model(tied=tied, spec=spec), random_targets(), clean_windows()
    space = all_sites(model)
    steps, seed, lam = 6, 3, 0.2
    if name == "slimming":
        got = slimming.rank(model, space, targets, clean, seed=seed, steps=steps, lam=lam, rows=5)
        spec = dict(theta0=torch.ones(space.total), gate=lambda g, gen: g,
                    penalty=lambda g: lam * (1 - g).sum(), project=lambda g: g.clamp_(0, 1),
                    lr=slimming.LR)
        to_score = lambda theta: 1 - theta  # noqa: E731
    elif name == "hard_concrete":
        got = hard_concrete.rank(model, space, targets, clean, seed=seed, steps=steps, lam=lam,
                                 rows=5)
        open_p = lambda a: torch.sigmoid(a - (2 / 3) * torch.log(torch.tensor(0.1 / 1.1)))  # noqa
        spec = dict(theta0=torch.full((space.total,), 2.0), gate=hard_concrete_draw,
                    penalty=lambda a: lam * (1 - open_p(a)).sum(), project=lambda a: None,
                    lr=hard_concrete.LR)
        to_score = lambda theta: -theta  # noqa: E731
    else:
        drop = 0.05
        got = balanced_subnet.rank(model, space, targets, clean, seed=seed, steps=steps,
                                   drop=drop, rows=5)
        init = 1 + 1e-3 * torch.rand(space.total, generator=torch.Generator().manual_seed(seed),
                                     dtype=torch.float64)
        spec = dict(theta0=init, gate=lowest_dropped(space, drop), penalty=None,
                    project=lambda s: None,
                    lr=balanced_subnet.LR)
        to_score = lambda theta: -theta  # noqa: E731
    # Batched (default rows), a subset, another order: each target's result is its own.
    module = {"slimming": slimming, "hard_concrete": hard_concrete,
              "balanced_subnet": balanced_subnet}[name]
    extra = {"drop": 0.05} if name == "balanced_subnet" else {"lam": lam}
    sub = module.rank(model, space, targets.subset(torch.tensor([2, 0])), clean, seed=seed,
                      steps=steps, **extra)
    torch.testing.assert_close(sub, got[[2, 0]], rtol=1e-9, atol=1e-12)
    for t in range(len(targets)):
        theta = reference_learning(model, space, targets, clean, t, steps=steps, seed=seed, **spec)
        torch.testing.assert_close(got[t], to_score(theta), rtol=1e-6, atol=1e-8)
    # The learning moved every MLP layer's neurons (heads pull harder than neurons, yet each
    # site's most-pulled channel moves by lr): scores are not their starting values.
    moved = (got - to_score(spec["theta0"].double())).abs()
    for name, off, count in zip(space.names, space.offsets, space.counts):
        if name.endswith("mlp_hidden"):
            assert (moved[:, off:off + count].amax(1) > 1e-3).all(), name


def planted_model():
    """A model that predicts 'Z' after 'Z' through one MLP neuron (block 0, neuron 5): 'Z' has a
    large embedding, the neuron fires only on it, its output column points where the head
    reads 'Z'. Sizes keep the neuron's output below the residual's own scale, so the layer norms
    do not flatten its effect."""
    model = tiny_model(seed=5)
    gen = torch.Generator().manual_seed(7)
    block = model.blocks[0]

    def centered_unit():
        v = torch.randn(32, generator=gen, dtype=torch.float64)
        return (v - v.mean()) / (v - v.mean()).norm()

    with torch.no_grad():
        model.tok_embed.weight.mul_(0.1)
        u, w = centered_unit(), centered_unit()
        model.tok_embed.weight[Z] = 6.0 * u
        block.fc1.weight[5] = u
        block.fc1.bias[5] = -3.5
        block.fc2.weight[:, 5] = 2.0 * w
        model.head.weight[Z] = 5.0 * w
    return model, 5


def test_methods_find_a_planted_neuron_first():
    model, neuron = planted_model()
    targets = make_targets([(b"ab!c%Z", b"ZZZZZZ"), (b"q7*Lm", b"xy=09w")])
    clean = clean_windows(6)
    space = all_sites(model)
    planted = space.flat("blocks.0.mlp_hidden", neuron)
    mlp = torch.cat([torch.full((c,), n.endswith("mlp_hidden"))
                     for n, c in zip(space.names, space.counts)])
    # The premise: the neuron carries the secret (likely with it, lost without it).
    nll = nll_of(model, targets)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.blocks[0].fc2.weight[:, neuron] = 0
    assert nll[0] < 1.0 and nll_of(edited, targets)[0] > 10.0
    for name in ("zero_out", "activations", "integrated_gradients", "gradient_magnitude",
                 "slimming", "hard_concrete", "balanced_subnet", "greedy"):
        scores = METHODS[name](model, space, targets, clean, seed=1)[0]
        # gradient magnitude: a head owns 32x a neuron's weights; learned masks: each site's
        # steps are normalized apart, so scores compare within a site: rank neurons only
        if name in ("gradient_magnitude", "slimming", "hard_concrete", "balanced_subnet"):
            scores = torch.where(mlp, scores, -torch.inf)
        best = int(scores.argmax())
        assert best == planted, (name, space.locate(best), scores[planted], scores[best])


@pytest.mark.parametrize("name, settings, fragment", [
    ("zero_out", {"rows": 0}, "rows must be positive"),
    ("integrated_gradients", {"steps": 0}, "steps must be positive"),
    ("slimming", {"lr": -0.1}, "lr must be positive"),
    ("hard_concrete", {"windows": 0}, "at least one clean window"),
    ("balanced_subnet", {"drop": 1.5}, "drop must be a fraction"),
])
def test_bad_settings_are_one_clear_error(name, settings, fragment):
    model, targets = tiny_model(), random_targets()
    with pytest.raises(ConfigError, match=fragment):
        METHODS[name](model, all_sites(model), targets, clean_windows(), **settings)


def test_clean_windows_of_the_wrong_shape_are_refused():
    model, targets = tiny_model(), random_targets()
    space = all_sites(model)
    with pytest.raises(ConfigError, match="clean windows"):
        METHODS["slimming"](model, space, targets, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="clean windows"):
        METHODS["activations"](model, space, targets, torch.zeros(3, 9))
