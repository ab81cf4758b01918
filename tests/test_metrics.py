import torch

from sae.architectures import TopKConfig, TopKSAE
from sae.evaluation.metrics import evaluate


def test_metrics_match_direct_computation_and_do_not_depend_on_batching():
    sae = TopKSAE(TopKConfig(num_latents=40, k=3), 8)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.randn(300, 8) * 2 + 1
    z = sae.encode(x)
    fvu = ((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    rate = (z > 0).float().mean(0)
    expected = {
        "fvu": fvu.item(),
        "l0": (z > 0).sum(1).float().mean().item(),
        "dead_fraction": (rate == 0).float().mean().item(),
        "dense_fraction": (rate > 0.1).float().mean().item(),
    }
    for batches in ([x], list(x.split(7))):
        got = evaluate(sae, batches)
        assert got["tokens"] == 300
        for key, value in expected.items():
            assert abs(got[key] - value) < 1e-5, key
