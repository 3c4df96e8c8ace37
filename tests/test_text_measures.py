"""Text measures: best-first exposure ranks equal brute force over a small secret space, the
batched greedy decoder equals a one-row loop, suffix accuracy counts what argmax predicts."""
import itertools
import math

import numpy as np
import pytest
import torch

from memkern.experiments.text.exposure import secret_exposure, sequence_log_probs
from memkern.experiments.text.extraction import extracted, greedy_continuations, suffix_accuracy
from memkern.network.models import build_text_model

SPEC = "gpt?layers=2&width=32&heads=2&mlp=64"


def model(seed, scale=1.0):
    torch.manual_seed(seed)
    m = build_text_model(SPEC, vocab=256, context=32).double().eval()
    with torch.no_grad():  # a peaked, non-uniform model: ranks differ by a lot
        m.head.weight.mul_(scale)
    return m


@pytest.mark.parametrize("seed,alphabet", [(0, (48, 49, 50, 51)), (1, (48, 49, 50)),
                                           (2, (97, 98, 99, 100, 101))])
def test_best_first_rank_equals_brute_force(seed, alphabet):
    m = model(seed, scale=30.0)
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(32, 127, (7,), generator=gen)
    length = 4
    everything = torch.tensor(list(itertools.product(alphabet, repeat=length)))
    lp = sequence_log_probs(m, prefix, everything)
    for pick in torch.randint(len(everything), (5,), generator=gen).tolist():
        secret = everything[pick]
        brute = 1 + int((lp > lp[pick]).sum())
        e = secret_exposure(m, prefix, secret, alphabet=alphabet, max_candidates=10 ** 6)
        assert e.exact and e.rank == brute, (pick, e.rank, brute)
        assert e.exposure == pytest.approx(length * math.log2(len(alphabet)) - math.log2(brute))


def test_rank_beyond_the_cap_is_estimated_and_bounded():
    m = model(3, scale=30.0)
    prefix = torch.tensor([65, 66, 67])
    alphabet = (48, 49, 50, 51)
    everything = torch.tensor(list(itertools.product(alphabet, repeat=5)))
    lp = sequence_log_probs(m, prefix, everything)
    worst = int(np.argmin(lp))
    e = secret_exposure(m, prefix, everything[worst], alphabet=alphabet, max_candidates=40)
    assert not e.exact and 1 <= e.rank <= 4 ** 5


def test_batched_greedy_equals_one_row_loop():
    m = model(4, scale=5.0)
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, 256, (9, 6), generator=gen)
    got = greedy_continuations(m, prompts, 5, batch_size=4)
    for row, cont in zip(prompts, got):
        seq = row.tolist()
        for _ in range(5):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[6:] == cont.tolist()
    secrets = got.clone()
    secrets[::2, -1] = (secrets[::2, -1] + 1) % 256
    assert extracted(m, prompts, secrets).tolist() == [i % 2 == 1 for i in range(9)]


def test_suffix_accuracy_counts_argmax_hits():
    m = model(5, scale=5.0)
    texts = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in range(5, 12):  # row 0 is the model's own greedy text from byte 5 on
            texts[0, t] = m(texts[:1, :t])[0, -1].argmax()
        want = (m(texts[:, :-1]).argmax(-1)[:, 4:] == texts[:, 5:]).double().mean(1)
    acc = suffix_accuracy(m, texts, 5)
    assert acc[0] == 1.0 and torch.allclose(acc.double(), want)
    assert acc[1:].max() < 1.0


class Oracle(torch.nn.Module):
    """A language model that has memorized one secret after any prefix of ``prefix_len`` bytes:
    logit 20 for its next digit, 0 for every other byte."""

    def __init__(self, prefix_len: int, secret: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.prefix_len, self.secret = prefix_len, secret

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, 256, dtype=torch.float64) + self.anchor
        for pos in range(tokens.shape[1]):
            k = pos - self.prefix_len + 1
            if 0 <= k < len(self.secret):
                logits[:, pos, self.secret[k]] = 20.0
        return logits


def test_a_memorized_secret_is_ranked_first_on_a_small_budget():
    secret = torch.tensor([ord(c) for c in "31415926"])
    prefix = torch.tensor([ord(c) for c in "The code of pi is "])
    m = Oracle(len(prefix), secret)
    e = secret_exposure(m, prefix, secret, max_candidates=100)  # 100 of 10^8 strings scored
    assert e.exact and e.rank == 1 and e.exposure == pytest.approx(8 * math.log2(10))
    assert extracted(m, prefix[None], secret[None]).tolist() == [True]
