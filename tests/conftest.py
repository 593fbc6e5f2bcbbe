import os
import tempfile
from pathlib import Path

import pytest
import torch

# One tiny checkpoint per test session, in a private folder (never the user's cache).
_HOME = Path(tempfile.mkdtemp(prefix="longcat_nb_test_home_"))
os.environ.setdefault("LONGCAT_NB_HOME", str(_HOME))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(4, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    from longcat_nb.model_files import resolve_checkpoint

    return resolve_checkpoint("")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
