"""Sequence targets: the padded rows' secret NLL equals the log-probability of the secret scored
one row at a time, and teacher-forced extraction equals greedy decoding."""
import torch

from memkern.data.text import load_text_data
from memkern.experiments.text.exposure import sequence_log_probs
from memkern.experiments.text.extraction import extracted
from memkern.experiments.text.targets import sequence_targets
from memkern.network.models import build_text_model

SPEC = "gpt?layers=2&width=32&heads=2&mlp=64"


def test_targets_match_one_row_scoring_and_greedy_decoding():
    data = load_text_data("text:stdlib", seq_len=64, seed=3, canaries=4, canary_reps=(1, 2),
                          dup_paragraphs=2, dup_reps=2, text_bytes=40_000)
    targets = sequence_targets(data.inserts, data)
    assert len(targets) == 6 and targets.ids == tuple(i.id for i in data.inserts)
    torch.manual_seed(0)
    model = build_text_model(SPEC, vocab=256, context=128).double().eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)
        logits = model(targets.inputs())
    nll = targets.secret_nll(logits)
    for t, insert in enumerate(data.inserts):
        prefix = torch.tensor(list(insert.prefix))
        secret = torch.tensor(list(insert.secret))[None]
        assert torch.allclose(-nll[t], torch.tensor(sequence_log_probs(model, prefix, secret)))
        assert bool(targets.extracted(logits)[t]) == bool(extracted(model, prefix[None], secret)[0])
    # A model that has the first target's secret by heart: the head predicts each scored byte.
    with torch.no_grad():
        forced = logits.clone()
        forced[0, targets.scored[0]] = -1e9
        rows = torch.nonzero(targets.scored[0]).flatten()
        forced[0, rows, targets.tokens[0, rows + 1]] = 0.0
    assert targets.extracted(forced)[0] and targets.secret_nll(forced)[0] < 1e-6
