"""The geoscout command line: each command parses its arguments and calls one plain function."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .device import DEVICE_HELP
from .errors import GeoscoutError, GeoscoutWarning

app = typer.Typer(
    help="geoscout: where in the USA is this street view? Feature store + lightweight heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as plain sentences: no file name, line number or source echo."""
    kind = "" if issubclass(category, GeoscoutWarning) else f" ({category.__name__})"
    print(f"warning{kind}: {message}", file=sys.stderr, flush=True)


@contextmanager
def _expected_failures():
    """What the user can fix (GeoscoutError) is one line and exit 1; anything else is a bug and keeps
    its traceback."""
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    except GeoscoutError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        warnings.showwarning = previous


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the synthetic competition layout into.")],
    train: Annotated[int, typer.Option(help="Training locations.")] = 1000,
    test: Annotated[int, typer.Option(help="Test locations.")] = 250,
    states: Annotated[int, typer.Option(help="How many states occur (the competition has 33).")] = 33,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same bytes.")] = 0,
) -> None:
    """Write a synthetic dataset in the competition's exact layout (plus test_ground_truth.csv).

    Locations are real US places, jittered; each view's colours, texture and gradients encode
    its state and position so that models can learn. For tests and the demo: not real imagery.
    """
    from .synth import synthesize

    with _expected_failures():
        summary = synthesize(out_dir, n_train=train, n_test=test, n_states=states, seed=seed)
    typer.echo(f"wrote {summary.n_train} train + {summary.n_test} test locations ({len(summary.states)} states) to {out_dir}")


@app.command()
def validate(
    data_dir: Annotated[Path, typer.Argument(help="Competition folder (train_ground_truth.csv, sample_submission.csv, ...).")],
    images: Annotated[bool, typer.Option(help="Decode every image too (parallel).")] = True,
    workers: Annotated[int, typer.Option(help="Decoding threads (0: twice the CPU count).")] = 0,
) -> None:
    """Check a competition folder: CSV columns and values, image names and every JPEG.

    Prints a summary and exits 0, or lists every problem (file, line, sample_id, column, value)
    and exits 1.
    """
    from .data import validate_competition

    report = validate_competition(data_dir, check_images=images, workers=workers or None)
    if report.competition is not None:
        typer.echo(report.summary())
    if not report.ok:
        typer.echo(f"{len(report.problems)} problem(s):", err=True)
        for p in report.problems:
            typer.echo(f"  - {p}", err=True)
        raise typer.Exit(1)
    typer.echo("ok: no problems found")


@app.command()
def score(
    truth_csv: Annotated[Path, typer.Argument(help="Truth CSV with sample_id, state_idx, latitude, longitude.")],
    submission_csv: Annotated[Path, typer.Argument(help="Submission CSV in the competition's format.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate a submission by the competition's rules, then apply the metric.

    score = 0.70 * classification + 0.30 * gps, where gps = max(0, 1 - mean_km / 5000).
    """
    from .metric import score_files

    with _expected_failures():
        result = score_files(truth_csv, submission_csv)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key:<22} {value:.6f}" if isinstance(value, float) else f"{key:<22} {value}")


def _parse_weights(items: list[str], backbones: list[str] | None = None) -> dict[str, str]:
    """BACKBONE=PATH_OR_HUB_ID items; a bare PATH_OR_HUB_ID when exactly one backbone is named."""
    from .extract.catalogue import canonical_name

    def names_a_backbone(name: str) -> bool:
        try:
            return canonical_name(name) in named
        except GeoscoutError:
            return False

    named = {canonical_name(b): b for b in backbones or []}
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        # a backbone name never holds '=', but a path might: only a named backbone splits the item
        if sep and name and value and (not named or names_a_backbone(name)):
            weights[name] = value
        elif len(named) == 1 and item:
            weights[next(iter(named))] = item
        else:
            raise typer.BadParameter(
                f"{item!r}: expected BACKBONE=PATH_OR_HUB_ID, e.g. streetclip=/models/StreetCLIP "
                "(a bare path is taken only when exactly one backbone is named)")
    return weights


@app.command()
def extract(
    data_dir: Annotated[Path, typer.Argument(help="Competition folder.")],
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder (created; resumed if it exists).")],
    backbone: Annotated[list[str], typer.Option("--backbone", "-b", help="Backbone(s) to embed with; repeat for several (each view is decoded once for all): a named entry (`geoscout backbones`), timm:<model>, open_clip:<model>[:<tag>], open_clip:hf-hub:<org>/<repo>, or random:<any of these> for random weights (tests, demos).")],
    weights: Annotated[list[str], typer.Option(help="BACKBONE=FILE|FOLDER|HUB_ID (repeat): a checkpoint file (.safetensors, or .pth/.bin holding only tensors), a model folder, or a hub id when online; a bare FILE|FOLDER|HUB_ID when one backbone is named. Required for real backbones.")] = [],
    split: Annotated[list[str], typer.Option(help="Split(s) to embed: train, test.")] = ["train", "test"],
    device: Annotated[str, typer.Option(help=f"Where the backbones run: {DEVICE_HELP}.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Views per forward pass (0: 256 on GPU, 32 on CPU).")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader decoding processes (-1: up to 8).")] = -1,
    bad_images: Annotated[str, typer.Option(help="fail: stop on a bad image; mask: mask the view, log it, carry on.")] = "fail",
    shard_size: Annotated[int, typer.Option(help="Locations per crash-safe shard.")] = 1024,
    compile: Annotated[bool, typer.Option(help="torch.compile the backbones (faster on long runs).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace stores made with other weights or preprocessing.")] = False,
    flip: Annotated[bool, typer.Option(help="Also embed every view mirrored left-right (features_flip), for flip test-time augmentation.")] = False,
    layers: Annotated[int, typer.Option(help="Also store, as DINOv2's linear probes read them, the class token of each of the last K blocks ('layers'; CNNs: each of the last K stages, pooled) and the mean of the final patch tokens ('patch_mean'). 0: the final features only.", min=0)] = 0,
) -> None:
    """Embed every view with frozen backbones into an HDF5 feature store.

    Resumable: rerun the same command after a crash and it finishes the job. Multi-GPU:
    `torchrun --nproc-per-node K -m geoscout.cli extract ...`.
    """
    from .extract.runner import extract as run_extract

    with _expected_failures():
        result = run_extract(
            data_dir, store_dir, backbones=backbone, weights=_parse_weights(weights, backbone), splits=tuple(split),
            device=device, batch_size=batch_size, workers=workers, bad_images=bad_images, shard_size=shard_size,
            compile=compile, overwrite=overwrite, flip=flip, layers=layers,
        )
    for item in result.written:
        typer.echo(f"wrote {item}")
    for item in result.skipped:
        typer.echo(f"already complete: {item}")


@app.command()
def backbones(
    name: Annotated[Optional[list[str]], typer.Argument(help="Backbone(s) to describe in full: a named entry or any timm:/open_clip: form.")] = None,
    layers: Annotated[int, typer.Option(help="Show the widths of the --layers K datasets too.", min=0)] = 0,
) -> None:
    """List the named backbones: input size, embedding width, GFLOPs per view, licence, published weights.

    Sizes, widths and GFLOPs come from each model built without weights (nothing is downloaded);
    GFLOPs are counted with torch's FlopCounterMode for one view at the model's input size
    (a multiply-add counts as 2). With NAME, prints everything about those backbones instead.
    """
    from .extract.catalogue import ENTRIES
    from .extract.describe import describe

    with _expected_failures():
        if name:
            for item in name:
                _print_description(describe(item, layers=layers))
            return
        typer.echo(f"{'name':<22} {'input':>6}  {'widths':<28} {'GFLOPs':>7}  {'licence':<16} published weights")
        for entry in ENTRIES:
            d = describe(entry.name, layers=layers)
            widths = ", ".join(f"{k} {v}" for k, v in d.output_dims.items())
            weights = "random (tests, demos)" if entry.random_init else d.default_weights
            aliases = f" (= {', '.join(entry.aliases)})" if entry.aliases else ""
            gflops = f"{d.gflops:7.1f}" if d.gflops >= 1 else f"{d.gflops:7.3f}"
            typer.echo(f"{entry.name:<22} {d.input_size[0]:>4}px  {widths:<28} {gflops}  {entry.licence:<16} {weights}")
            typer.echo(f"  {entry.form}{aliases}: {entry.summary}")
        typer.echo("Any timm:<model> or open_clip:<model>[:<tag>] works as well; `geoscout backbones NAME` describes one.")


def _print_description(d) -> None:
    typer.echo(f"{d.name}")
    typer.echo(f"  library          {d.library}: {d.model}" + (f" (pretrained tag {d.tag})" if d.tag else ""))
    typer.echo(f"  input            {d.input_size[0]}x{d.input_size[1]}, from 256x256 views: "
               + (", ".join(f"{k} {v}" for s in d.preprocessing["steps"] for k, v in s.items()) or "used as they are"))
    typer.echo(f"  mean / std       {d.preprocessing['mean']} / {d.preprocessing['std']}")
    typer.echo(f"  library config   {json.dumps(d.data_config)}")
    typer.echo(f"  widths           {', '.join(f'{k} {v}' for k, v in d.output_dims.items())}")
    typer.echo(f"  GFLOPs per view  {d.gflops:.2f}")
    typer.echo(f"  weights          {'random (seeded)' if d.random_init else d.default_weights or 'give --weights'}"
               + (f"; licence {d.licence}" if d.licence else ""))


@app.command()
def knn(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    backbone: Annotated[str, typer.Option(help="Backbone whose features to search.")],
    k: Annotated[int, typer.Option(help="Neighbours per query.")] = 10,
    threshold: Annotated[float, typer.Option(help="Cosine similarity at or above which two locations count as near-duplicates.", min=0.0, max=1.0)] = 0.98,
    query: Annotated[Optional[int], typer.Option(help="Print this sample_id's nearest training locations.")] = None,
    gpu: Annotated[str, typer.Option(help="auto: a faiss GPU index when faiss-gpu sees a GPU; yes; no.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """FAISS neighbour diagnostic: kNN state accuracy and km on validation, near-duplicates across splits.

    Uses the saved validation split (STORE_DIR/validation_split.json) when heads were trained.
    """
    from .knn import run_knn
    from .store.layout import validation_split_path

    use_gpu = {"auto": "auto", "yes": True, "no": False}.get(gpu)
    if use_gpu is None:
        raise typer.BadParameter(f"--gpu {gpu!r}; choose auto, yes or no")
    split_file = validation_split_path(store_dir)
    with _expected_failures():
        report = run_knn(store_dir, backbone=backbone, k=k, threshold=threshold, query=query, use_gpu=use_gpu,
                         split_file=split_file if split_file.exists() else None)
    typer.echo(json.dumps(report.to_json()) if as_json else report.format())


HeadsOption = Annotated[Path, typer.Option("--heads", help="Folder of trained heads (HEADS/PRESET/classifier-BACKBONE, regressor, ensemble).")]
PresetOption = Annotated[str, typer.Option(help="Head recipe: default (fast, tuned) or seed (the reference design).")]
DeviceOption = Annotated[str, typer.Option(help=f"Where the heads run: {DEVICE_HELP}.")]
SeedOption = Annotated[int, typer.Option(help="Random seed (training is deterministic on CPU for a seed).")]


def _heads(heads: Path, preset: str):
    from .heads.presets import PRESETS
    from .stages import HeadPaths

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    return HeadPaths(heads, preset)


@app.command()
def train(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    backbone: Annotated[str, typer.Option(help="Backbone whose features to train on.")],
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
) -> None:
    """Train a state classifier (view fusion + head) on one backbone's cached features.

    The first head trained on a store fixes the validation split (STORE_DIR/validation_split.json,
    10% of each state) that every later head and the ensemble share.
    """
    from .stages import train_classifier_stage

    with _expected_failures():
        result = train_classifier_stage(store_dir, _heads(heads, preset), backbone, device=device, seed=seed)
    typer.echo(f"classifier -> {result.out_dir}: validation score {result.metrics['score']:.4f}, "
               f"top-1 {result.metrics['top1_accuracy']:.4f} (best epoch {result.best_epoch}, {result.seconds:.1f} s)")


@app.command("train-regressor")
def train_regressor(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    backbone: Annotated[str, typer.Option(help="The trained classifier whose outputs the regressor reads.")],
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
) -> None:
    """Train the residual regressor: the offset from the predicted state's centroid, haversine loss."""
    from .stages import train_regressor_stage

    with _expected_failures():
        r = train_regressor_stage(store_dir, _heads(heads, preset), backbone, device=device, seed=seed)
    typer.echo(f"regressor -> {r.out_dir}: validation mean {r.regressor_mean_km:.1f} km vs {r.centroid_mean_km:.1f} km "
               f"at the predicted state's centroid ({100 * r.relative_gain:.1f}% lower)")


@app.command()
def ensemble(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    backbone: Annotated[list[str], typer.Option("--backbone", "-b", help="The two classifiers to combine (repeat; default: the two trained).")] = [],
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    device: DeviceOption = "auto",
) -> None:
    """Fit the logit-level ensemble alpha*A + (1-alpha)*B of two classifiers on validation."""
    from .stages import fit_ensemble_stage

    paths = _heads(heads, preset)
    with _expected_failures():
        result = fit_ensemble_stage(store_dir, paths, backbone or paths.trained_backbones(), device=device)
    typer.echo(f"ensemble -> {result.out_dir}: alpha {result.alpha:.2f} toward {result.members[0]}, "
               f"validation score {result.metrics['score']:.4f}")
    for point in result.curve:
        typer.echo(f"  alpha {point['alpha']:.2f}  score {point['score']:.4f}")


@app.command()
def evaluate(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    device: DeviceOption = "auto",
) -> None:
    """Print the full metric set on the validation rows for each head, the ensemble and the trivial baseline."""
    from .stages import evaluate_stage

    with _expected_failures():
        typer.echo(evaluate_stage(store_dir, _heads(heads, preset), device=device).table())


@app.command()
def predict(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder (with test features).")],
    out: Annotated[Path, typer.Option(help="Submission CSV to write.")] = Path("submission.csv"),
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    template: Annotated[Optional[Path], typer.Option(help="sample_submission.csv to fill (default: the store's data folder's).")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Write a competition submission for the test split: the ensemble when fitted, else classifier + regressor.

    Top-5 as original state_idx, latitude/longitude, every template column; checked by the
    competition's rules before it is written.
    """
    from .stages import predict_stage

    with _expected_failures():
        frame = predict_stage(store_dir, _heads(heads, preset), out, device=device, template=template)
    typer.echo(f"wrote {out} ({frame.height} locations)")


@app.command()
def ablate(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder with two backbones (extracted with --flip for the flip TTA rows).")],
    work: Annotated[Path, typer.Option(help="Folder for the heads (WORK/ablation/) and the table (WORK/eval/ablation.json, shown by `geoscout report WORK`).")] = Path("ablation-work"),
    seeds: Annotated[int, typer.Option(help="Training seeds per recipe.", min=1)] = 3,
    tau: Annotated[list[float], typer.Option(help="Also train the default at this haversine tau in km (repeat).")] = [],
    device: DeviceOption = "cpu",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default; 1 keeps timings steady on a busy machine).")] = 0,
) -> None:
    """Train the seed recipe, the default, and the default without each addition (haversine smoothing,
    geocells, retrieval, expected-distance decoding, flip TTA) over seeds; print mean ± std tables.

    Scored on the validation rows and, for synthetic data (test_ground_truth.csv), on the test split.
    """
    import torch

    from .ablation import markdown_table, run_ablation

    if threads:
        torch.set_num_threads(threads)
    with _expected_failures():
        result = run_ablation(store_dir, work_dir=work, seeds=seeds, taus=tuple(tau), device=device)
    for split in ("test", "validation"):
        if split in result["recipes"][0]:
            typer.echo(f"\n{split} ({result[f'n_{split}']} locations), mean ± std over {seeds} seed(s):")
            typer.echo(markdown_table(result, split))


@app.command()
def report(work_dir: Annotated[Path, typer.Argument(help="A `geoscout run` work folder.")]) -> None:
    """Build WORK_DIR/report/index.html: scores, map, error CDF, confusion matrix, per-state bars, alpha curve."""
    from .report import build_report

    with _expected_failures():
        typer.echo(f"wrote {build_report(work_dir)}")


@app.command()
def run(
    data_dir: Annotated[Optional[Path], typer.Argument(help="Competition folder.")] = None,
    work: Annotated[Optional[Path], typer.Option(help="Work folder: store, heads, submission.csv, report/.")] = None,
    backbones: Annotated[Optional[str], typer.Option(help="Comma-separated backbones (one or two) [default: streetclip,convnextv2-large].")] = None,
    weights: Annotated[list[str], typer.Option(help="BACKBONE=PATH or BACKBONE=HUB_ID (repeat).")] = [],
    preset: Annotated[list[str], typer.Option(help="Head recipe(s); the first writes the submission; repeat to compare [default: default].")] = [],
    device: Annotated[Optional[str], typer.Option(help=f"{DEVICE_HELP} [default: auto].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Extraction batch size in views.")] = None,
    bad_images: Annotated[Optional[str], typer.Option(help="fail or mask.")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip", help="Also extract mirrored views for flip test-time augmentation (twice the extraction work).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="A TOML file with these settings (a run's WORK/config.toml reproduces it); flags override it.")] = None,
) -> None:
    """The whole job: validate, extract, train, ensemble, predict, report.

    Idempotent and resumable: rerun the same command and completed stages are skipped
    (fingerprints checked); a killed run picks up where it stopped. Writes
    WORK/submission.csv, WORK/store/, WORK/heads/, WORK/report/index.html and the resolved
    WORK/config.toml.
    """
    from .run import RunConfig, run_pipeline, score_table

    overrides = dict(
        data_dir=data_dir, work_dir=work, backbones=backbones.split(",") if backbones else None,
        weights=_parse_weights(weights) or None, presets=preset or None, device=device, batch_size=batch_size,
        bad_images=bad_images, flip=flip,
    )
    with _expected_failures():
        if config is not None:
            cfg = RunConfig.from_toml(config, **overrides)
        else:
            if data_dir is None or work is None:
                raise typer.BadParameter("give DATA_DIR and --work (or --config)")
            cfg = RunConfig(**{k: v for k, v in overrides.items() if v is not None})
        result = run_pipeline(cfg)
    typer.echo(score_table(result.scores))


@app.command()
def demo(
    work: Annotated[Path, typer.Option(help="Work folder for the demo.")] = Path("demo-work"),
    train: Annotated[int, typer.Option(help="Synthetic training locations.")] = 600,
    test: Annotated[int, typer.Option(help="Synthetic test locations.")] = 150,
    states: Annotated[int, typer.Option(help="Synthetic states.")] = 20,
) -> None:
    """Run the whole pipeline on a synthetic dataset with tiny random backbones (CPU, a few minutes).

    Shows every stage working on a fresh machine without data or weights; the scores say
    nothing about real accuracy.
    """
    from .run import run_demo

    with _expected_failures():
        run_demo(work, n_train=train, n_test=test, n_states=states)


def main() -> None:  # `python -m geoscout.cli` (torchrun needs a module)
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
