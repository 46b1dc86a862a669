"""The whole job: per-stage CLI chain, `geoscout run` (idempotent, resumable after SIGKILL), `demo` pieces."""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from geoscout.cli import app
from geoscout.extract.runner import extract
from geoscout.run import RunConfig, run_pipeline

runner = CliRunner()
BACKBONES = ["tiny-clip-random", "tiny-convnext-random"]


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    """A synthetic folder big enough to learn from, and its store."""
    from geoscout.synth import synthesize

    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    synthesize(data, n_train=240, n_test=40, n_states=6, seed=0, progress=False)
    store = root / "store"
    extract(data, store, backbones=BACKBONES, device="cpu", workers=0, progress=False)
    return data, store


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + (result.stderr if result.stderr_bytes else "")
    return result


def score(truth, submission):
    return json.loads(invoke("score", truth, submission, "--json").stdout)


@pytest.mark.parametrize("preset", ["default", "seed"])
def test_stage_commands_chain_to_a_valid_submission(synth_run, tmp_path, preset):
    data, store_master = synth_run
    store = Path(shutil.copytree(store_master, tmp_path / "store"))
    heads = tmp_path / "heads"
    common = ["--heads", heads, "--preset", preset, "--device", "cpu", "--folds", "3"]
    trained = invoke("train", store, *common).stdout
    assert "out-of-fold score" in trained
    fitted = invoke("ensemble", store, *common)
    assert "weight" in fitted.stdout and "temperature" in fitted.stdout
    # The default asks for flip TTA where the store has mirrored views; this one (no --flip) says so plainly.
    expected = "not available: the store has no mirrored views" if preset == "default" else "not asked for"
    assert f"flip TTA: {expected}" in fitted.stdout
    assert "warning" not in fitted.stderr
    assert "ensemble" in invoke("evaluate", store, *common).stdout
    submission = tmp_path / "submission.csv"
    invoke("predict", store, "--out", submission, *common)
    template = pl.read_csv(data / "sample_submission.csv")
    written = pl.read_csv(submission)
    assert written.columns == template.columns
    assert written["sample_id"].to_list() == template["sample_id"].to_list()
    got = score(data / "test_ground_truth.csv", submission)
    baseline = score(data / "test_ground_truth.csv", data / "sample_submission.csv")
    assert got["score"] > baseline["score"] + 0.25, (got, baseline)


def test_the_cli_ensemble_combines_three_trained_classifiers(synth_run, tmp_path):
    """Members of any number: three classifiers (two backbones, one of them twice through the probe's
    backbones) trained one by one, then one ensemble that weighs all three."""
    data, store_master = synth_run
    store = Path(shutil.copytree(store_master, tmp_path / "store"))
    common = ["--heads", tmp_path / "heads", "--device", "cpu", "--folds", "3"]
    names = ["classifier-tiny-clip-random", "classifier-tiny-convnext-random", "probe-tiny-clip-random+tiny-convnext-random"]
    for name in names:
        invoke("train", store, "--member", name, *common)
    out = invoke("ensemble", store, *(x for n in names for x in ("--member", n)), *common).stdout
    record = json.loads((tmp_path / "heads" / "default" / "ensemble" / "ensemble.json").read_text())
    assert [m["name"] for m in record["members"]] == names
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1.0)
    assert all(n in out for n in names)


def run_cmd(data, work):
    return [sys.executable, "-m", "geoscout.cli", "run", str(data), "--work", str(work),
            "--backbones", ",".join(BACKBONES), "--device", "cpu", "--folds", "3"]


@pytest.fixture(scope="module")
def reference_run(synth_run, tmp_path_factory):
    data, _ = synth_run
    work = tmp_path_factory.mktemp("reference") / "work"
    result = run_pipeline(RunConfig(data_dir=data, work_dir=work, backbones=BACKBONES, device="cpu", folds=3),
                          progress=False, log=lambda _: None)
    return work, result


def test_run_writes_everything_and_a_rerun_skips_every_stage(reference_run):
    work, first = reference_run
    assert (work / "report" / "index.html").exists() and (work / "config.toml").exists()
    scores = json.loads((work / "eval" / "scores.json").read_text())
    assert scores["default/ensemble"]["score"] > scores["baseline"]["score"] + 0.25
    submitted = (work / "submission.csv").read_text()
    again = run_pipeline(RunConfig.from_toml(work / "config.toml"), progress=False, log=lambda _: None)
    assert again.ran == [] and set(again.skipped) == set(first.ran)
    assert (work / "submission.csv").read_text() == submitted


def _kill_at(data, work, condition):
    proc = subprocess.Popen(run_cmd(data, work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and not condition() and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before the kill point"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "submission.csv").exists()


def _finish_and_compare(data, work, reference):
    done = subprocess.run(run_cmd(data, work), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "submission.csv").read_text() == (reference / "submission.csv").read_text()
    return done.stdout


def test_run_resumes_after_sigkill_during_training(synth_run, reference_run, tmp_path):
    data, _ = synth_run
    work = tmp_path / "killed"
    _kill_at(data, work, lambda: (work / "stages" / "default.classifier-tiny-clip-random.json").exists())
    out = _finish_and_compare(data, work, reference_run[0])
    assert "[skip] default.classifier-tiny-clip-random" in out and "[run]  default.ensemble" in out


@pytest.mark.slow
def test_run_resumes_after_sigkill_in_every_stage(synth_run, reference_run, tmp_path):
    data, _ = synth_run
    work = tmp_path / "killed"
    stages = work / "stages"
    for condition in (
        lambda: any((work / "store" / ".shards").rglob("*.npz")) if (work / "store" / ".shards").exists() else False,
        lambda: (work / "store" / "test.tiny-convnext-random.h5").exists(),
        lambda: (stages / "default.classifier-tiny-convnext-random.json").exists(),
        lambda: (stages / "default.probe-tiny-clip-random+tiny-convnext-random.json").exists(),
        lambda: (stages / "default.ensemble.json").exists(),
    ):
        _kill_at(data, work, condition)
    _finish_and_compare(data, work, reference_run[0])


def test_run_stops_at_validation_on_a_bad_image(synth_run, tmp_path):
    data, _ = synth_run
    bad = Path(shutil.copytree(data, tmp_path / "data"))
    name = pl.read_csv(bad / "train_ground_truth.csv")["image_north"][3]
    (bad / "train_images" / name).write_bytes(b"")
    result = runner.invoke(app, ["run", str(bad), "--work", str(tmp_path / "work"), "--backbones", ",".join(BACKBONES), "--device", "cpu"])
    assert result.exit_code == 1 and name in result.stderr and "empty" in result.stderr
    assert not (tmp_path / "work" / "store").exists()


def test_a_one_backbone_run_writes_a_valid_submission(synth_run, tmp_path):
    data, _ = synth_run
    work = tmp_path / "one"
    result = run_pipeline(RunConfig(data_dir=data, work_dir=work, backbones=["tiny-clip"], device="cpu", folds=3),
                          progress=False, log=lambda _: None)
    record = json.loads((work / "heads" / "default" / "ensemble" / "ensemble.json").read_text())
    assert [m["name"] for m in record["members"]] == ["classifier-tiny-clip-random", "probe-tiny-clip-random"]
    got = score(data / "test_ground_truth.csv", result.submission)
    assert got["score"] > score(data / "test_ground_truth.csv", data / "sample_submission.csv")["score"] + 0.25


def test_editing_a_recipe_retrains_what_it_changed(synth_run, reference_run, tmp_path, monkeypatch):
    """Stage keys hold the resolved configs, not the preset's name."""
    from geoscout.heads import presets

    data, _ = synth_run
    work = tmp_path / "work"
    shutil.copytree(reference_run[0], work)
    (work / "config.toml").write_text((work / "config.toml").read_text().replace(str(reference_run[0]), str(work)))
    default = presets.default_classifier
    monkeypatch.setattr(presets, "default_classifier", lambda: dataclasses.replace(default(), dropout=0.25))
    again = run_pipeline(RunConfig.from_toml(work / "config.toml"), progress=False, log=lambda _: None)
    assert set(again.ran) == {"default.classifier-tiny-clip-random", "default.classifier-tiny-convnext-random",
                              "default.ensemble"}


def test_run_with_three_backbones_one_from_a_weights_file_weighs_all_three(synth_run, tmp_path):
    """`geoscout run DATA --backbones tiny-clip,tiny-convnext,timm:test_convnext --weights
    timm:test_convnext=FILE.safetensors`: a valid submission from an ensemble whose weights cover them all."""
    import timm
    from safetensors.torch import save_file

    data, _ = synth_run
    weights = tmp_path / "test_convnext.safetensors"
    save_file(timm.create_model("test_convnext", pretrained=False).state_dict(), str(weights))
    work = tmp_path / "work"
    invoke("run", data, "--work", work, "--backbones", "tiny-clip,tiny-convnext,timm:test_convnext",
           "--weights", f"timm:test_convnext={weights}", "--device", "cpu", "--folds", "3")
    record = json.loads((work / "heads" / "default" / "ensemble" / "ensemble.json").read_text())
    backbones = {b for m in record["members"] for b in m["backbones"]}
    assert backbones == {"tiny-clip-random", "tiny-convnext-random", "timm:test_convnext"}
    assert len(record["members"]) == 4 and sum(m["weight"] for m in record["members"]) == pytest.approx(1.0)
    assert score(data / "test_ground_truth.csv", work / "submission.csv")["n"] == 40
