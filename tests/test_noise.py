import pytest
import torch

from memkern.data import load_dataset, prepare
from memkern.data.noise import apply_label_noise
from memkern.errors import ConfigError


@pytest.mark.parametrize("n,rate", [(1437, 0.1), (1000, 0.05), (7, 0.2), (50000, 0.2), (10, 0.0)])
def test_exact_count_distinct_and_always_wrong(n, rate):
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(n))
    noise = apply_label_noise(labels, rate=rate, num_classes=10, seed=3)
    assert len(noise.noisy_indices) == round(rate * n)
    assert len(set(noise.noisy_indices.tolist())) == len(noise.noisy_indices)
    changed = (noise.labels != labels).nonzero().flatten()
    assert torch.equal(changed, noise.noisy_indices)
    assert torch.equal(noise.original_labels, labels[noise.noisy_indices])


def test_every_wrong_class_is_reachable_uniformly():
    # The reference code never picks (y - 1) mod C; here all C - 1 wrong classes appear equally.
    labels = torch.full((60000,), 4)
    noise = apply_label_noise(labels, rate=0.5, num_classes=10, seed=0)
    counts = torch.bincount(noise.labels[noise.noisy_indices], minlength=10)
    assert counts[4] == 0
    expected = 30000 / 9
    # 5 sigma of a binomial(30000, 1/9) count.
    sigma = (30000 * (1 / 9) * (8 / 9)) ** 0.5
    assert all(abs(int(c) - expected) < 5 * sigma for i, c in enumerate(counts) if i != 4), counts


def test_seeded_and_seed_dependent():
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(1))
    a = apply_label_noise(labels, rate=0.1, num_classes=10, seed=7)
    b = apply_label_noise(labels, rate=0.1, num_classes=10, seed=7)
    c = apply_label_noise(labels, rate=0.1, num_classes=10, seed=8)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.noisy_indices, c.noisy_indices)


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_rate_out_of_range(rate):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        apply_label_noise(torch.zeros(10, dtype=torch.long), rate=rate, num_classes=10, seed=0)


def test_digits_split_is_fixed_and_real():
    raw = load_dataset("digits")
    assert raw.train_images.shape == (1437, 1, 8, 8) and raw.test_images.shape == (360, 1, 8, 8)
    assert raw.train_images.dtype == torch.uint8 and int(raw.train_images.max()) == 255
    assert torch.equal(raw.train_labels, load_dataset("digits").train_labels)
    assert torch.bincount(raw.test_labels).min() >= 35  # stratified: ~36 per class
    data = prepare(raw, noise_rate=0.1, seed=0)
    assert len(data.noise.noisy_indices) == 144
    assert abs(float(data.train_images.mean())) < 1e-5
