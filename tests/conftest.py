import os

# Tests never reach a hub: everything they load is built locally or shipped.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import tempfile

import pytest
from browser import CHROMEDRIVER, start_chromium
from tiny_models import FAMILIES, make_tiny_model

# Headless Chromium for the browser tests (the report's and the explorer's): needs
# /usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium chromium-driver). Without
# them those tests skip, unless SAE_REQUIRE_BROWSER=1 (CI), where they fail.


def browser_unavailable(reason: str):
    if os.environ.get("SAE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SAE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium for the module, with the console log kept."""
    if not CHROMEDRIVER.exists():
        browser_unavailable(f"{CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser_unavailable("selenium is not installed (pip install -e '.[dev]')")
    profile = tempfile.TemporaryDirectory()
    d = start_chromium(profile.name, console_log=True)
    yield d
    d.quit()
    profile.cleanup()


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


EXPLORER_STATS_TOKENS = 20000


def open_explorer(demo_sae_run, cache):
    """An explorer (sae.serve) over the demo SAE with a short statistics scan cached in ``cache``."""
    from sae.analysis.feature_stats import StatsSettings
    from sae.serve.explorer import Explorer

    settings = StatsSettings(tokens=EXPLORER_STATS_TOKENS, top_examples=5)
    return Explorer.open(
        [demo_sae_run / "layers.2"], settings=settings, cache_dir=cache, log=lambda line: None
    )


@pytest.fixture(scope="module")
def explorer(demo_sae_run, tmp_path_factory):
    """The explorer over the demo SAE, shared by a test module."""
    return open_explorer(demo_sae_run, tmp_path_factory.mktemp("explorer-stats"))


@pytest.fixture
def fresh_explorer(demo_sae_run, tmp_path):
    """An explorer of the test's own, whose statistics are not scanned yet."""
    return open_explorer(demo_sae_run, tmp_path / "stats")


class HeldScan:
    """The explorer's statistics scan, held after its first batch: it idles (one short step
    at a time, so the model worker goes on serving others) until ``release()``, then
    finishes, or raises ``fail`` if that is set."""

    def __init__(self, real):
        import threading

        self.real, self.gate, self.fail = real, threading.Event(), None

    def release(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.gate.set()

    def __call__(self, *args, **kwargs):
        import time

        steps = self.real(*args, **kwargs)
        first = next(steps)  # a fresh cache: there is a first batch
        while not self.gate.is_set():
            yield first
            time.sleep(0.005)
        if self.fail is not None:
            raise self.fail
        return (yield from steps)


@pytest.fixture
def held_scan(monkeypatch):
    import sae.serve.explorer as module

    held = HeldScan(module.cached_feature_stats_steps)
    monkeypatch.setattr(module, "cached_feature_stats_steps", held)
    return held


@pytest.fixture(scope="session")
def firing_sae():
    """A random TopK SAE for the tiny Llama's width (64; 32 latents, k = 8) whose features
    fire at most positions, so edits of them change something."""
    import torch

    from sae.config import sae_config
    from sae.training.trainer import make_sae

    torch.manual_seed(0)
    s = make_sae(sae_config("topk", num_latents=32, k=8), 64)
    with torch.no_grad():
        s.b_enc.add_(0.5)
    return s
