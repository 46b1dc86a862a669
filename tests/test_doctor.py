"""`geoscout doctor` on the CPU with tiny backbones: its table, its arithmetic, its failures."""

import hashlib

import pytest
from typer.testing import CliRunner

from geoscout.cli import app
from geoscout.doctor import COMPETITION_LOCATIONS, run_doctor


def test_doctor_prints_its_table_with_the_weights_hashes_and_a_projection_for_data(synth_master, tiny_hf_clip_folder, tmp_path):
    done = CliRunner().invoke(app, [
        "doctor", str(synth_master), "-b", "streetclip", "-b", "tiny-convnext", "--weights",
        f"streetclip={tiny_hf_clip_folder}", "--store", str(tmp_path / "store"), "--device", "cpu", "--batches", "1",
    ])
    assert done.exit_code == 0, done.output
    table = done.stdout
    for row in ("version", "CUDA build", "cuDNN", "bf16", "precision", "torch.compile", "faiss", "index", "/dev/shm",
                "HDF5", "locking", "disk", "decoding", "together", "projected"):
        assert f" {row} " in table, row
    digest = hashlib.sha256((tiny_hf_clip_folder / "model.safetensors").read_bytes()).hexdigest()
    assert f"model.safetensors sha256 {digest[:16]}" in table
    assert "tiny-convnext-random  random init by design" in table
    assert f"for {synth_master} ({(40 + 12) * 4} views) on this one CPU" in table
    assert "0 failure(s)" in table


def test_doctor_projects_the_competition_without_data_and_fails_on_unusable_weights(tmp_path):
    report = run_doctor(backbones=["tiny-clip", "tiny-convnext"], weights={"tiny-convnext": str(tmp_path)},
                        store_dir=tmp_path, device="cpu", batches=1)
    clip, convnext = report.speeds["tiny-clip-random"], report.speeds["tiny-convnext-random"]
    assert report.speeds["together"] == pytest.approx(1 / (1 / clip + 1 / convnext))
    assert report.projected_s == pytest.approx(COMPETITION_LOCATIONS * 4 / report.speeds["together"])
    rows = {(f.section, f.name): f for f in report.findings}
    # 82,475 locations x 4 views x (64 features + 32 projected + 128 features) x 2 bytes
    assert f"the store needs {COMPETITION_LOCATIONS * 4 * (64 + 32 + 128) * 2 / 2**20:.1f} MiB" in rows["store", "disk"].value
    bad = rows["weights", "tiny-convnext-random"]
    assert bad.status == "fail" and "randomly initialised by design and takes no weights" in bad.value
    assert report.failed
