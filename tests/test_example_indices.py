"""Each thread's rows carry that thread's dataset indices (memkern.network.sites.example_indices)."""
import threading

import torch

from memkern.kernels.channel_mask_reference import tied_mask_values
from memkern.network.sites import POST_ACTIVATION, ChannelSite, example_indices, name_sites
from memkern.network.tied_dropout import attach_tied_dropout, site_tied_dropout

P = dict(p_gen=0.25, p_mem=0.5)


def test_two_threads_inside_each_others_context_keep_their_own_masks():
    model = torch.nn.Sequential(ChannelSite(16, POST_ACTIVATION))
    name_sites(model)
    attach_tied_dropout(model, sites=["0"], seed=5, **P)
    site = model[0]
    seed = site_tied_dropout(site).seed
    x = torch.randn(6, 16, 3, 3, dtype=torch.float64)
    ids = {"a": torch.arange(6), "b": torch.arange(1000, 1006)}
    # Both threads enter their context before either runs its forward, and leave it only after
    # both ran: with one process-wide value, one thread would run under the other's indices.
    entered, ran, outputs = threading.Barrier(2), threading.Barrier(2), {}

    def work(name: str) -> None:
        with example_indices(ids[name]):
            entered.wait(timeout=30)
            outputs[name] = model(x)
            ran.wait(timeout=30)

    threads = [threading.Thread(target=work, args=(n,)) for n in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, rows in ids.items():
        mask = tied_mask_values(rows, channels=16, seed=seed, mode="train", **P)
        torch.testing.assert_close(outputs[name], x * mask[:, :, None, None].double(),
                                   rtol=0, atol=0)
    assert not torch.equal(outputs["a"], outputs["b"])
