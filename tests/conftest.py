import os

# Tests never reach a hub: everything they load is built locally or shipped.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from tiny_models import FAMILIES, make_tiny_model


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tmp_path_factory):
    """Folder of a tiny random model (one per family), loadable with from_pretrained."""
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """One tiny random Llama, for tests that need a model but not every family."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """(model, tokenizer) of the tiny Llama, loaded through sae.models.loading.load_model in fp32 on CPU."""
    from sae.config import ModelConfig
    from sae.models.loading import load_model

    return load_model(ModelConfig(name_or_path=str(tiny_llama_dir), device="cpu"))


@pytest.fixture(scope="session")
def demo_sae_run(tmp_path_factory):
    """Run folder of a small TopK SAE (1024 latents, k = 32) trained on 300k tokens of the
    demo model's layers.2: good enough to have interpretable features (~35 s)."""
    from sae.config import load_config
    from sae.training.run import train_run

    root = tmp_path_factory.mktemp("demo-sae")
    cfg = load_config(
        None,
        [
            f"output.root={root}",
            "output.run_name=run",
            "output.tensorboard=false",
            "data.token_budget=300000",
            "data.eval_split=null",
            "hooks=[layers.2]",
            "sae.expansion_factor=4",
            "sae.k=32",
            "train.batch_tokens=2048",
            "train.warmup_steps=20",
            "train.dead_tokens=100000",
        ],
    )
    return train_run(cfg, log=lambda line: None)
