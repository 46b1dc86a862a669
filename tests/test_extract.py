"""Extraction into the store: layout, resume after SIGKILL, conflicts, bad images, torchrun."""

import json
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
import torch
from typer.testing import CliRunner

from geoscout.cli import app
from geoscout.data import load_competition
from geoscout.errors import GeoscoutWarning
from geoscout.extract import runner
from geoscout.extract.backbones import load_backbone
from geoscout.extract.dataset import ViewsDataset
from geoscout.extract.runner import NonFiniteFeatures, StoreConflict, extract
from geoscout.images import ImageError
from geoscout.problems import InputError
from geoscout.store.reader import StoreError, read_split
from geoscout.store.writer import ShardedWriter

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


def test_streetclip_from_a_huggingface_folder_end_to_end(synth_master, tiny_hf_clip_folder, tmp_path):
    """The real `streetclip` entry, fed a tiny HF CLIPModel folder: store rows equal the embedder's output."""
    import hashlib
    import json

    folder = tiny_hf_clip_folder
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


def _cosines(a, b):
    a, b = a.astype(np.float32).reshape(-1, a.shape[-1]), b.astype(np.float32).reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bf16_on_the_cpu_agrees_with_fp32_and_the_store_records_it(synth_master, reference_store, tmp_path):
    store = tmp_path / "store"
    args = ["extract", str(synth_master), str(store), *sum((["-b", b] for b in BACKBONES), []), "--split", "test",
            "--precision", "bf16", "--device", "cpu", "--workers", "0", "--shard-size", "4", "--batch-size", "16"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "precision bf16, compile off" in done.stderr  # compile stays off on the CPU unless asked for
    for name in BACKBONES:
        with h5py.File(store / f"test.{name}.h5", "r") as f, h5py.File(reference_store / f"test.{name}.h5", "r") as ref:
            assert f.attrs["precision"] == "bf16" and ref.attrs["precision"] == "fp32"
            assert f.attrs["backbone_fingerprint"] != ref.attrs["backbone_fingerprint"]  # heads never mix the two
            for key in ("features", "projected") if "projected" in f else ("features",):
                low, full = f[key][()], ref[key][()]
                assert not np.array_equal(low, full)  # bf16 autocast really ran
                assert _cosines(low, full).min() >= 0.99, (name, key)


def _stop_before_sealing(self, sample_id):
    raise RuntimeError("stopped before sealing")


def test_a_store_is_never_completed_or_reused_at_another_precision(synth_master, reference_store, tmp_path, monkeypatch):
    name = "tiny-clip-random"
    one = dict(backbones=[name], splits=("test",))
    store, fresh = tmp_path / "store", tmp_path / "fresh"
    # an fp32 run that computed every shard and stopped before sealing
    monkeypatch.setattr(ShardedWriter, "seal", _stop_before_sealing)
    with pytest.raises(RuntimeError, match="before sealing"):
        run_extract(synth_master, store, **one)
    assert len(list((store / ".shards" / f"test.{name}").glob("shard_*.npz"))) == 3
    monkeypatch.undo()
    # resumed at bf16: the fp32 shards are discarded, never mixed in
    with pytest.warns(GeoscoutWarning, match="discarding 3 shard.*precision fp32, this run asks for bf16"):
        run_extract(synth_master, store, precision="bf16", **one)
    run_extract(synth_master, fresh, precision="bf16", **one)
    assert_same_store(store, fresh)
    # a sealed bf16 store is not reused, nor silently replaced, by an fp32 run
    with pytest.raises(StoreConflict, match="computed at precision bf16, not fp32; pass --overwrite"):
        run_extract(synth_master, store, precision="fp32", **one)
    run_extract(synth_master, store, precision="fp32", overwrite=True, **one)
    with h5py.File(store / f"test.{name}.h5", "r") as f, h5py.File(reference_store / f"test.{name}.h5", "r") as ref:
        assert f.attrs["precision"] == "fp32"
        np.testing.assert_array_equal(f["features"][()], ref["features"][()])


def test_shards_of_another_device_are_never_mixed_in(synth_master, reference_store, tmp_path, monkeypatch):
    """A run resumed on another kind of device (a GPU's shards, a CPU rerun) starts the store again:
    the two compute the same precision with different last bits."""
    name = "tiny-clip-random"
    one = dict(backbones=[name], splits=("test",))
    store = tmp_path / "store"
    monkeypatch.setattr(ShardedWriter, "seal", _stop_before_sealing)
    with pytest.raises(RuntimeError, match="before sealing"):
        run_extract(synth_master, store, **one)
    monkeypatch.undo()
    run_file = store / ".shards" / f"test.{name}" / "identity.json"
    record = json.loads(run_file.read_text())
    assert record["device"] == "cpu"
    run_file.write_text(json.dumps({**record, "device": "cuda"}, sort_keys=True))  # as a GPU run leaves it
    with pytest.warns(GeoscoutWarning, match="discarding 3 shard.*computed on cuda, this run is on cpu"):
        run_extract(synth_master, store, **one)
    with h5py.File(store / f"test.{name}.h5", "r") as f, h5py.File(reference_store / f"test.{name}.h5", "r") as ref:
        np.testing.assert_array_equal(f["features"][()], ref["features"][()])


def test_a_non_finite_view_fails_loudly_and_names_its_row(synth_master, tmp_path, monkeypatch):
    real_load = runner.load_backbone

    class Poisoned(torch.nn.Module):
        """The real trunk, with one view beyond float16's range and one NaN in every batch."""

        def __init__(self, trunk):
            super().__init__()
            self.trunk = trunk

        def forward(self, x):
            out = {key: value.clone() for key, value in self.trunk(x).items()}
            out["features"][5, 0] = 1e6  # finite in float32, inf in the float16 store: flat view 5 = location 1, east
            out["features"][10, 3] = float("nan")  # flat view 10 = location 2, south
            return out

    def load_poisoned(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded.embedder.trunk = Poisoned(loaded.embedder.trunk)
        return loaded

    monkeypatch.setattr(runner, "load_backbone", load_poisoned)
    sample_id = load_competition(synth_master).train.sample_id
    store = tmp_path / "store"
    with pytest.raises(NonFiniteFeatures) as failure:
        run_extract(synth_master, store, backbones=["tiny-convnext-random"], splits=("train",), check_images=False)
    message = str(failure.value)
    assert "tiny-convnext-random" in message and "'features'" in message and "precision fp32" in message
    assert f"train sample_id={sample_id[1]} view=east, sample_id={sample_id[2]} view=south" in message
    assert not list(store.glob("*.h5")) and not list(store.glob(".shards/*/shard_*.npz"))


@pytest.mark.slow
def test_compiled_with_padded_last_batches_equals_eager_and_compiles_once_per_backbone(synth_master, tmp_path, monkeypatch):
    compiled_names, shapes = [], set()
    real_compile = torch.compile

    def compile_and_watch(model, **kwargs):
        compiled_names.append(model.spec.name)
        compiled = real_compile(model, **kwargs)

        def run(images):
            shapes.add(tuple(images.shape))
            return compiled(images)
        return run

    monkeypatch.setattr(torch, "compile", compile_and_watch)
    # 3 locations a batch, 8 a shard: every shard of both splits ends with a short batch
    args = dict(batch_size=12, shard_size=8)
    eager = tmp_path / "eager"
    assert not run_extract(synth_master, eager, **args).compiled and not compiled_names
    result = run_extract(synth_master, tmp_path / "compiled", compile=True, **args)
    assert result.compiled and sorted(compiled_names) == sorted(BACKBONES)  # once per backbone, not per split
    assert shapes == {(12, 3, 256, 256)}  # one shape: the short batches were padded
    compiled, reference = store_contents(tmp_path / "compiled"), store_contents(eager)
    assert compiled.keys() == reference.keys()
    for name, (datasets, _) in ((n, v) for n, v in compiled.items() if n.endswith(".h5")):
        for key, values in datasets.items():
            np.testing.assert_allclose(values.astype(np.float32), reference[name][0][key].astype(np.float32),
                                       rtol=1e-2, atol=1e-2, err_msg=f"{name}/{key}")
            if key.startswith(("features", "projected")):
                assert _cosines(values, reference[name][0][key]).min() >= 0.9999


def test_no_check_images_with_decoding_workers_stops_on_a_bad_image_in_one_line(synth_dir, tmp_path):
    table = pl.read_csv(synth_dir / "train_ground_truth.csv")
    name, sid = table["image_east"][5], table["sample_id"][5]
    (synth_dir / "train_images" / name).write_bytes(b"")
    with pytest.raises(ImageError) as failure:  # raised in a DataLoader worker process, reported here
        run_extract(synth_dir, tmp_path / "store", backbones=["tiny-clip-random"], splits=("train",),
                    check_images=False, workers=2)
    message = str(failure.value)
    assert "\n" not in message and "Traceback" not in message
    assert f"sample_id={sid} column image_east='{name}': image file is empty" in message


def test_torchrun_rank_that_fails_ends_every_process_and_a_rerun_completes(synth_dir, reference_store, tmp_path):
    """Rank 1 meets a bad image in its first shard: every process ends within a minute. Fixed, a
    two-process rerun resumes and writes the same store as one process."""
    table = pl.read_csv(synth_dir / "train_ground_truth.csv")
    # 40 rows in shards of 4: rank 1 takes shards 1, 3, 5, ...; row 4 is the first row of shard 1
    bad, sid = synth_dir / "train_images" / table["image_east"][4], table["sample_id"][4]
    original = bad.read_bytes()
    bad.write_bytes(original[:500])
    store = tmp_path / "store"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", *_cli(synth_dir, store)[1:]]
    proc = subprocess.Popen([*cmd, "--no-check-images"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, failed_at = [], None
    for line in proc.stdout:  # the first "error:" line is the failing rank's
        lines.append(line)
        if failed_at is None and "error:" in line:
            failed_at = time.monotonic()
    proc.wait(timeout=120)
    output = "".join(lines)
    assert proc.returncode != 0 and failed_at is not None, output[-3000:]
    assert time.monotonic() - failed_at < 60, output[-3000:]
    assert f"sample_id={sid} column image_east=" in output
    assert not list(store.glob("*.h5"))
    bad.write_bytes(original)  # repaired
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_store(store, reference_store)


@pytest.mark.slow
def test_a_machine_where_compile_fails_gets_one_line_naming_no_compile(synth_master, tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    from geoscout.doctor import run_doctor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))  # no C++ compiler, as on some GPU images
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    with pytest.raises(runner.CompileFailed, match="tiny-convnext-random.*No working C.. compiler.*rerun with --no-compile"):
        run_extract(synth_master, tmp_path / "store", backbones=["tiny-convnext"], splits=("test",), compile=True)
    report = run_doctor(backbones=["tiny-convnext"], store_dir=tmp_path, device="cpu", compile=True, batches=1)
    row = next(f for f in report.findings if f.name == "torch.compile")
    assert row.status == "warn" and "fails" in row.value  # off by default on the CPU: a warning there
    assert "compile off" in next(f for f in report.findings if f.name == "setting").value  # timed eager instead
