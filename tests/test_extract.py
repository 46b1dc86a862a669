"""Extraction into the store: layout, resume after SIGKILL, conflicts, bad images, torchrun."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest

from geoscout.data import load_competition
from geoscout.extract.backbones import load_backbone
from geoscout.extract.dataset import ViewsDataset
from geoscout.extract.runner import StoreConflict, extract
from geoscout.problems import InputError
from geoscout.store.reader import StoreError, read_split

BACKBONES = ["tiny-clip-random", "tiny-convnext-random"]


def run_extract(data_dir, store_dir, **kwargs):
    args = dict(backbones=BACKBONES, device="cpu", workers=0, shard_size=4, batch_size=16, progress=False)
    args.update(kwargs)
    return extract(data_dir, store_dir, **args)


def store_contents(store_dir):
    """Everything a store holds (datasets and attributes), for exact comparisons."""
    out = {}
    for path in sorted(Path(store_dir).glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.name] = ({k: f[k][()] for k in f}, {k: str(v) for k, v in f.attrs.items()})
    for path in sorted(Path(store_dir).glob("*.csv")):
        out[path.name] = path.read_text()
    return out


def assert_same_store(a, b):
    ca, cb = store_contents(a), store_contents(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        if name.endswith(".csv"):
            assert ca[name] == cb[name], name
            continue
        (da, aa), (db, ab) = ca[name], cb[name]
        assert aa == ab, name
        assert da.keys() == db.keys()
        for k in da:
            assert da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k]), f"{name}/{k} differs"


@pytest.fixture(scope="module")
def reference_store(synth_master, tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "store"
    run_extract(synth_master, store)
    return store


def test_store_layout_and_reader(synth_master, reference_store):
    comp = load_competition(synth_master)
    assert not (reference_store / ".shards").exists() or not any((reference_store / ".shards").iterdir())
    with h5py.File(reference_store / "train.tiny-clip-random.h5", "r") as f:
        assert f["features"].shape[:2] == (40, 4) and f["features"].dtype == np.float16
        assert f["features"].chunks is None  # contiguous: whole-split reads at disk speed
        assert f["projected"].shape[:2] == (40, 4)
        assert f["mask"][()].all()
        np.testing.assert_array_equal(f["sample_id"][()], comp.train.sample_id)
        assert f.attrs["dataset_fingerprint"] == comp.fingerprint()
        assert f.attrs["split_fingerprint"] == comp.train.fingerprint()
        assert f.attrs["complete"]
    train = read_split(reference_store, "train", BACKBONES)
    assert train.features["tiny-convnext-random"].shape[:2] == (40, 4)
    np.testing.assert_array_equal(train.classes[train.class_id], comp.train.state_idx)
    np.testing.assert_allclose(train.latlon, comp.train.latlon)
    test = read_split(reference_store, "test", BACKBONES)
    assert test.class_id is None and len(test) == 12
    assert np.isfinite(train.features["tiny-clip-random"].astype(np.float32)).all()


def test_rerun_skips_complete_stores(synth_master, reference_store, tmp_path):
    store = Path(shutil.copytree(reference_store, tmp_path / "store"))
    result = run_extract(synth_master, store)
    assert result.written == [] and len(result.skipped) == 4
    assert_same_store(store, reference_store)


def _cli(data_dir, store_dir, *extra):
    return [sys.executable, "-m", "geoscout.cli", "extract", str(data_dir), str(store_dir),
            *sum((["--backbone", b] for b in BACKBONES), []), "--device", "cpu", "--workers", "0",
            "--shard-size", "4", "--batch-size", "16", *extra]


def _kill_when(cmd, condition, env):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def test_sigkill_at_several_points_then_rerun_gives_identical_store(synth_master, reference_store, tmp_path):
    """Killed, resumed and killed again at each stage: the final store equals an uninterrupted run."""
    store = tmp_path / "store"
    shards = store / ".shards"

    def count(split):
        return sum(len(list(d.glob("shard_*.npz"))) for d in shards.glob(f"{split}.*")) if shards.exists() else 0

    points = {
        "first train shard": lambda: count("train") >= 1,
        "half the train shards": lambda: count("train") >= 10,
        "train sealed": lambda: (store / "train.tiny-convnext-random.h5").exists(),
        "first test shard": lambda: count("test") >= 1,
    }
    for point, condition in points.items():
        assert _kill_when(_cli(synth_master, store), condition, dict(os.environ)), f"finished before {point}"
        assert not (store / "test.tiny-convnext-random.h5").exists()
    done = subprocess.run(_cli(synth_master, store), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not any(shards.iterdir())
    assert_same_store(store, reference_store)


def test_store_of_other_data_is_refused(synth_master, reference_store, tmp_path):
    from geoscout.synth import synthesize

    other = tmp_path / "other"
    synthesize(other, n_train=40, n_test=12, n_states=6, seed=1, progress=False)
    store = Path(shutil.copytree(reference_store, tmp_path / "store"))
    with pytest.raises(StoreConflict, match="another dataset"):
        run_extract(other, store)
    # a features file copied in from another dataset's store is refused by the reader
    other_store = tmp_path / "other_store"
    run_extract(other, other_store, backbones=["tiny-clip-random"], splits=("train",))
    shutil.copy(other_store / "train.tiny-clip-random.h5", store / "train.tiny-clip-random.h5")
    with pytest.raises(StoreError, match="other data"):
        read_split(store, "train", ["tiny-clip-random"])


def test_flip_embeds_the_mirrored_views_beside_the_plain_ones(synth_master, reference_store, tmp_path):
    store = tmp_path / "store"
    name = "tiny-convnext-random"
    run_extract(synth_master, store, backbones=[name], splits=("train",), flip=True)
    with h5py.File(store / f"train.{name}.h5", "r") as f, h5py.File(reference_store / f"train.{name}.h5", "r") as ref:
        flipped = f["features_flip"][()]
        np.testing.assert_array_equal(f["features"][()], ref["features"][()])  # the plain features are untouched
    # each mirrored view is the backbone's embedding of that view flipped left-right, in the same slot
    embedder = load_backbone(name, None).embedder
    _, images, _, _ = ViewsDataset(load_competition(synth_master).train, bad_images="fail")[2]
    expected = embedder(images.flip(-1))["features"].numpy()
    np.testing.assert_allclose(flipped[2].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert not np.allclose(flipped[2].astype(np.float32), embedder(images)["features"].numpy(), atol=1e-2)
    np.testing.assert_array_equal(read_split(store, "train", [name]).flipped[name], flipped)
    # a plain run is served by the --flip store; a --flip run does not take a plain store for one
    assert run_extract(synth_master, store, backbones=[name], splits=("train",)).written == []
    plain = Path(shutil.copytree(reference_store, tmp_path / "plain"))
    with pytest.raises(StoreConflict, match="without --flip"):
        run_extract(synth_master, plain, backbones=[name], splits=("train",), flip=True)


def test_bad_image_fail_policy_lists_the_file(synth_dir, tmp_path):
    name = pl.read_csv(synth_dir / "train_ground_truth.csv")["image_east"][5]
    (synth_dir / "train_images" / name).write_bytes(b"")
    with pytest.raises(InputError, match=f"column image_east='{name}': image file is empty"):
        run_extract(synth_dir, tmp_path / "store")


def test_bad_image_mask_policy_masks_and_logs(synth_dir, tmp_path):
    table = pl.read_csv(synth_dir / "train_ground_truth.csv")
    name, sid = table["image_east"][5], table["sample_id"][5]
    path = synth_dir / "train_images" / name
    path.write_bytes(path.read_bytes()[:500])
    store = tmp_path / "store"
    run_extract(synth_dir, store, bad_images="mask", backbones=["tiny-clip-random"])
    train = read_split(store, "train", ["tiny-clip-random"])
    row = int(np.flatnonzero(train.sample_id == sid)[0])
    assert not train.masks["tiny-clip-random"][row, 1]
    assert train.masks["tiny-clip-random"].sum() == 40 * 4 - 1
    assert not train.features["tiny-clip-random"][row, 1].any()
    log = pl.read_csv(store / "train.tiny-clip-random.bad_views.csv")
    assert log.rows() == [(sid, "east", name, log["error"][0])] and "truncated" in log["error"][0]


def test_torchrun_two_processes_equal_one(synth_master, reference_store, tmp_path):
    store = tmp_path / "store"
    torchrun = Path(sys.executable).with_name("torchrun")
    # --standalone picks a free port; _cli(...)[1:] is "-m geoscout.cli extract ..."
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", *_cli(synth_master, store)[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_store(store, reference_store)


def test_streetclip_from_a_huggingface_folder_end_to_end(synth_master, tmp_path):
    """The real `streetclip` entry, fed a tiny HF CLIPModel folder: store rows equal the embedder's output."""
    import hashlib
    import json

    import torch
    transformers = pytest.importorskip("transformers")
    from geoscout.data import load_competition
    from geoscout.extract.backbones import load_backbone
    from geoscout.extract.dataset import ViewsDataset

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           patch_size=8, image_size=32, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=8,
    )
    folder = tmp_path / "StreetCLIP"
    transformers.CLIPModel(config).save_pretrained(folder)
    store = tmp_path / "store"
    extract(synth_master, store, backbones=["streetclip"], weights={"streetclip": str(folder)}, splits=("train",),
            device="cpu", workers=0, progress=False)
    with h5py.File(store / "train.streetclip.h5", "r") as f:
        stored, projected = f["features"][:3], f["projected"][:3]
        identity = json.loads(f.attrs["weights_identity"])
    assert stored.shape == (3, 4, 32) and projected.shape == (3, 4, 8)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest in json.dumps(identity)
    embedder = load_backbone("streetclip", str(folder), "cpu").embedder
    views = ViewsDataset(load_competition(synth_master).train, bad_images="fail")
    images = torch.cat([views[i][1] for i in range(3)])
    expected = embedder(images)
    np.testing.assert_allclose(stored.reshape(12, 32), expected["features"].numpy(), atol=2e-3, rtol=2e-3)  # fp16 store
    np.testing.assert_allclose(projected.reshape(12, 8), expected["projected"].numpy(), atol=2e-3, rtol=2e-3)
