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
