"""Every analysis on every model, plain and with example-tied dropout, on tiny shapes, each
against its reference. Tied models run in mode "own": every row must carry its own dataset
index, so each batched path is compared with rows run one at a time with their own index
(a row paired with another example's index gets another mask and another result)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from memkern.data.prepared import PreparedData, prepare
from memkern.data.splits import RawSplits
from memkern.training.evaluate import mode_accuracies, split_accuracies
from memkern.experiments.gradients.norms import per_example_grad_norms
from memkern.experiments.localize import LocalizationObjective, channel_space, greedy_localize
from memkern.experiments.localize.exhaustive import exhaustive_localize
from memkern.experiments.localize.scan import ablation_scan, naive_ablation_scan
from memkern.network.models import build_model, layer_groups
from memkern.experiments.retrain.algorithm import retrain_group
from memkern.experiments.rewind.algorithm import with_group_from
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import attach_tied_dropout, set_tied_dropout_mode, tied_dropout_mode
from zoo_checks import needs_zoo

# model -> (image size, sites to localize and scan: small ones keep resnet50 and vit cheap);
# the torchvision and timm models carry sites attached by hooks (memkern.network.attach)
TIMM_VIT = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=3"
MODELS = {"cnn": (8, ["block1.pre", "hidden.post"]), "mlp": (8, ["hidden1.pre", "hidden2.post"]),
          "resnet9": (12, ["conv1.pre", "res1.body.0.post"]),
          "resnet50": (8, ["stem.pre", "stage3.5.post"]),
          "vit": (8, ["blocks.0.hidden", "blocks.2.hidden"]),
          "torchvision:resnet18": (16, ["layer1.0.conv1", "layer1.0.conv2:in", "layer2.0"]),
          TIMM_VIT: (16, ["blocks.0.mlp.act", "blocks.2.mlp.act"])}
CASES = [pytest.param((m, v), id=f"{m.split('?')[0]}-{v}", marks=needs_zoo if ":" in m else ())
         for m in MODELS for v in ("plain", "tied")]


def _data(size: int) -> PreparedData:
    g = torch.Generator().manual_seed(1)
    raw = RawSplits(name="tiny", num_classes=10,
                    train_images=torch.randint(0, 256, (10, 3, size, size), generator=g,
                                               dtype=torch.uint8),
                    train_labels=torch.randint(0, 10, (10,), generator=g),
                    test_images=torch.randint(0, 256, (4, 3, size, size), generator=g,
                                              dtype=torch.uint8),
                    test_labels=torch.randint(0, 10, (4,), generator=g))
    return prepare(raw, noise_rate=0.3, seed=0)


def _model(name: str, variant: str, size: int):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=size).double().eval()
    for m in model.modules():  # running statistics as after training
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    if variant == "tied":
        # p_mem 0.5: about half of every example's memorization channels, so masks differ a lot
        attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.25,
                            p_mem=0.5, seed=3)
        set_tied_dropout_mode(model, "own")
    return model


@pytest.fixture(scope="module", params=CASES)
def case(request):
    name, variant = request.param
    size, sites = MODELS[name]
    data = _data(size)
    data.train_images, data.test_images = data.train_images.double(), data.test_images.double()
    return name, variant, _model(name, variant, size), data, sites


def _row_by_row(model, x, ids):
    """Logits of each row run alone with its own index: the reference for batched paths."""
    out = []
    for i in range(len(x)):
        with example_indices(None if ids is None else ids[i:i + 1]):
            out.append(model(x[i:i + 1]))
    return torch.cat(out)


def test_evaluate_modes(case):
    name, variant, model, data, _ = case
    n = len(data.train_labels)
    want = _row_by_row(model, data.train_images, torch.arange(n)).argmax(1) == data.train_labels
    got = split_accuracies(model, data)
    noisy = data.noisy_mask
    assert got["clean_acc"] == pytest.approx(want[~noisy].double().mean().item())
    assert got["noisy_acc"] == pytest.approx(want[noisy].double().mean().item())
    if variant == "tied":
        for mode in ("keep", "drop"):
            with tied_dropout_mode(model, mode):
                plain = model(data.train_images).argmax(1) == data.train_labels
            assert mode_accuracies(model, data, mode=mode)["clean_acc"] == \
                pytest.approx(plain[~noisy].double().mean().item())


def test_grads_ghost_func_loop_agree(case):
    name, variant, model, data, _ = case
    x, y = data.train_images[:3], data.train_labels[:3]
    ids = torch.tensor([0, 1, 2])
    loop = per_example_grad_norms(model, x, y, ids=ids, mode="loop")
    loose = name in ("vit", TIMM_VIT)  # cls_token, pos_embed: no ghost rule, func in auto
    modes = ("func", "auto") if loose else ("ghost", "func", "auto")
    for mode in modes:
        torch.testing.assert_close(per_example_grad_norms(model, x, y, ids=ids, mode=mode), loop,
                                   rtol=1e-6, atol=1e-9, msg=f"{name} {variant} {mode}")
    if variant == "tied":  # another example's index gives another mask: the index matters
        other = per_example_grad_norms(model, x, y, ids=ids + 5, mode="loop")
        assert not torch.allclose(other, loop)


def test_rewind_state_equals_loaded_copy(case):
    name, variant, model, data, _ = case
    final = {k: v.detach() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    early = build_model(name, num_classes=10, in_channels=3,
                        image_size=data.image_size).double().state_dict()
    group = layer_groups(model)[1]
    state = with_group_from(final, early, [group])
    copied = copy.deepcopy(model)
    copied.load_state_dict(state)
    assert split_accuracies(model, data, state=state) == split_accuracies(copied, data)


def test_retrain_changes_only_its_group(case):
    name, variant, model, data, _ = case
    model = copy.deepcopy(model)
    group = layer_groups(model)[-1]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = retrain_group(model, group, data, epochs=1, lr=0.05, weight_decay=0.0, batch_size=4,
                         seed=0)
    assert [r["epoch"] for r in rows] == [0, 1]
    after = model.state_dict()
    owned = set(group.param_names) | set(group.buffer_names)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in owned)
    assert any(not torch.equal(before[k], after[k]) for k in group.param_names)


def _objective(data):
    return LocalizationObjective(data.train_images, data.train_labels, torch.tensor([1, 4, 6, 8]),
                                 eot=1, seed=0)


def test_greedy_batched_equals_one_at_a_time_and_its_objective(case):
    name, variant, model, data, sites = case
    space = channel_space(model, sites)
    objective = _objective(data)
    targets = torch.tensor([0, 4, 7])
    batched = greedy_localize(model, objective, targets, space=space, max_channels=3)
    for r in batched:
        alone = greedy_localize(model, objective, torch.tensor([r.index]), space=space,
                                max_channels=3)[0]
        assert (r.channels, r.flipped) == (alone.channels, alone.flipped)
        assert r.trace == pytest.approx(alone.trace, rel=1e-9, abs=1e-12)
    # step 0 of target 4 (a reference too), rows run alone with their own indices
    t = 4
    logits = _row_by_row(model, objective.inputs(torch.tensor([t])), objective.ids(torch.tensor([t])))
    ce = F.cross_entropy(logits, objective.labels[objective.ids(torch.tensor([t]))],
                         reduction="none")
    refs = ce[objective.target_rows:]
    want = (refs.sum() - refs[objective.ref.tolist().index(t)]) / (len(refs) - 1) - \
        F.cross_entropy(logits[1:objective.target_rows].mean(0, keepdim=True),
                        objective.labels[[t]])
    assert batched[1].trace[0] == pytest.approx(float(want.detach()), rel=1e-9, abs=1e-12)


def test_exhaustive_first_choice_is_the_scan_argmin(case):
    name, variant, model, data, sites = case
    space = channel_space(model, sites[:1])
    objective = _objective(data)
    t = torch.tensor(2)
    res = exhaustive_localize(model, objective, t[None], space=space, max_channels=1,
                              candidates=8)[0]
    if res.channels:
        x, ids = objective.inputs(t[None]), objective.ids(t[None])
        values = naive_ablation_scan(model, x, lambda lg: objective(lg, t.expand(len(lg)))[0],
                                     sites=space, ids=ids)
        assert values[space.flat(*res.channels[0])] == pytest.approx(
            float(values.nan_to_num(float("inf")).min()), rel=1e-9)


def test_scan_equals_naive_loop(case):
    name, variant, model, data, sites = case
    space = channel_space(model, sites)
    x, y = data.train_images[:2], data.train_labels[:2]
    ids = torch.tensor([3, 9])
    cand = torch.randperm(space.total, generator=torch.Generator().manual_seed(0))[:24]
    got = ablation_scan(model, x, y, sites=space, candidates=cand, ids=ids, max_rows=16)
    want = naive_ablation_scan(model, x, y, sites=space, candidates=cand, ids=ids)
    torch.testing.assert_close(got.values, want, rtol=1e-9, atol=1e-11, equal_nan=True)
    assert all(path.startswith("delta") for path in got.path.values()), got.path
