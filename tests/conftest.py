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


@pytest.fixture(scope="session")
def tiny_hf_clip_folder(tmp_path_factory) -> Path:
    """A tiny transformers CLIPModel folder (config.json + model.safetensors), as StreetCLIP's is laid out."""
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           patch_size=8, image_size=32, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=8,
    )
    folder = tmp_path_factory.mktemp("hf") / "StreetCLIP"
    transformers.CLIPModel(config).save_pretrained(folder)
    return folder
