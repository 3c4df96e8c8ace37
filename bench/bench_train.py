"""One training epoch on the embedded digits dataset: examples per second."""
import pytest
import torch
import torch.nn.functional as F
from conftest import rounds

from memkern.training.config import TrainConfig
from memkern.data.prepared import iterate_batches
from memkern.rundir.context import load_data, model_for
from memkern.network.sites import example_indices
from memkern.training.step import make_optimizer, sgd_step


@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_digits_epoch(benchmark, model_name, quick, context_info):
    config = TrainConfig(model=model_name)
    data = load_data(config)
    limit = 256 if quick else len(data.train_labels)
    images, labels = data.train_images[:limit], data.train_labels[:limit]
    torch.manual_seed(0)
    model = model_for(config, data).train()
    opt = make_optimizer(model.parameters(), lr=config.lr, momentum=config.momentum,
                        weight_decay=config.weight_decay)

    def epoch():
        gen = torch.Generator().manual_seed(0)
        for x, y, idx in iterate_batches(images, labels, config.batch_size, generator=gen):
            sgd_step(model, opt, x, y, ids=idx)

    def loss_now() -> float:
        """Training loss on the timed examples (eval mode), to check the epochs trained."""
        model.eval()
        with torch.no_grad(), example_indices(torch.arange(limit)):
            loss = float(F.cross_entropy(model(images), labels))
        model.train()
        return loss

    benchmark.group = "train epoch (digits)"
    before = loss_now()
    benchmark.pedantic(epoch, rounds=rounds(5), warmup_rounds=1)
    assert loss_now() < before, "the timed epochs did not train the model"
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(context_info, model=model_name, examples=limit,
                                batch_size=config.batch_size,
                                examples_per_second=round(limit / seconds, 1))
