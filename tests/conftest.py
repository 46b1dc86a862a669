import os
import shutil
from pathlib import Path

import pytest

# No test may touch the network: hub ids must fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def synth_master(tmp_path_factory) -> Path:
    """One small synthetic competition folder, written once per session."""
    from geoscout.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, n_train=40, n_test=12, n_states=6, seed=0, progress=False)
    return root


@pytest.fixture
def synth_dir(synth_master, tmp_path) -> Path:
    """A private copy of the synthetic folder that a test may damage."""
    return Path(shutil.copytree(synth_master, tmp_path / "data"))
