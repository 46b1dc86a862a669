"""The geoscout command line: each command parses its arguments and calls one plain function."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .device import DEVICE_HELP, PRECISION_HELP
from .errors import ConfigError, GeoscoutError, GeoscoutWarning

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
    difficulty: Annotated[str, typer.Option(help="standard, lookalike (neighbouring states look alike), imbalanced, noisy (grain, blank and broken views) or hard (all of them); the options below override its parts.")] = "standard",
    lookalike: Annotated[Optional[float], typer.Option(help="0..1: how far each state's look moves toward its nearest neighbour's.")] = None,
    imbalance: Annotated[Optional[float], typer.Option(help="State frequencies also fall as rank^-IMBALANCE.")] = None,
    noise: Annotated[Optional[float], typer.Option(help="Multiplier of the pixel grain.")] = None,
    blank_views: Annotated[Optional[float], typer.Option(help="Share of views that show nothing of the place.")] = None,
    broken_views: Annotated[Optional[float], typer.Option(help="Share of views written as truncated JPEGs (extract them with --bad-images mask).")] = None,
) -> None:
    """Write a synthetic dataset in the competition's exact layout (plus test_ground_truth.csv).

    Locations are real US places, jittered; each view's colours, texture and gradients encode
    its state and position so that models can learn. For tests, benchmarks and the demo: not
    real imagery. --difficulty makes it harder the ways real data is hard.
    """
    from .synth import difficulty_from, synthesize

    with _expected_failures():
        level = difficulty_from(difficulty, lookalike=lookalike, imbalance=imbalance, noise=noise,
                                blank_views=blank_views, broken_views=broken_views)
        summary = synthesize(out_dir, n_train=train, n_test=test, n_states=states, seed=seed, difficulty=level)
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
    precision: Annotated[str, typer.Option(help=f"What the backbones compute in: {PRECISION_HELP}. Part of the store's identity: a store is never completed or reused at another precision.")] = "auto",
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile each backbone once, for one batch shape [default: on with CUDA, off on the CPU].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Views per forward pass (0: 256 on GPU, 32 on CPU).")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader decoding processes (-1: the CPUs this process may use, shared by the processes on this node, at most 8; fewer when /dev/shm is small).")] = -1,
    bad_images: Annotated[str, typer.Option(help="fail: stop on a bad image; mask: mask the view, log it, carry on.")] = "fail",
    check_images: Annotated[bool, typer.Option("--check-images/--no-check-images", help="Decode every image before embedding (shared by torchrun processes). Skip it when `geoscout validate` passed: a bad image then stops the run where it is met.")] = True,
    shard_size: Annotated[int, typer.Option(help="Locations per crash-safe shard.")] = 1024,
    overwrite: Annotated[bool, typer.Option(help="Replace stores made with other weights, preprocessing or precision.")] = False,
    flip: Annotated[bool, typer.Option(help="Also embed every view mirrored left-right (features_flip), for flip test-time augmentation.")] = False,
    layers: Annotated[int, typer.Option(help="Also store, as DINOv2's linear probes read them, the class token of each of the last K blocks ('layers'; CNNs: each of the last K stages, pooled) and the mean of the final patch tokens ('patch_mean'). 0: the final features only.", min=0)] = 0,
) -> None:
    """Embed every view with frozen backbones into an HDF5 feature store.

    Resumable: rerun the same command after a crash and it finishes the job. Multi-GPU:
    `torchrun --nproc-per-node K -m geoscout.cli extract ...`; if one process fails, all stop
    with an error and a rerun resumes. `geoscout doctor` checks a machine first.
    """
    from .extract.runner import extract as run_extract

    with _expected_failures():
        result = run_extract(
            data_dir, store_dir, backbones=backbone, weights=_parse_weights(weights, backbone), splits=tuple(split),
            device=device, precision=precision, compile=compile, batch_size=batch_size, workers=workers,
            bad_images=bad_images, check_images=check_images, shard_size=shard_size, overwrite=overwrite, flip=flip,
            layers=layers,
        )
    for item in result.written:
        typer.echo(f"wrote {item}")
    for item in result.skipped:
        typer.echo(f"already complete: {item}")


@app.command()
def doctor(
    data_dir: Annotated[Optional[Path], typer.Argument(help="Competition folder: project its time and store size, and time decoding its JPEGs [default: the competition's 65,980 + 16,495 locations].")] = None,
    backbone: Annotated[list[str], typer.Option("--backbone", "-b", help="Backbone(s) to check and time (repeat) [default: streetclip, convnextv2-large].")] = [],
    weights: Annotated[list[str], typer.Option(help="BACKBONE=PATH or BACKBONE=HUB_ID: weights to find and hash (real backbones are timed with random weights without them).")] = [],
    store: Annotated[Optional[Path], typer.Option(help="Where the feature store will go: HDF5 locking and free disk are checked there [default: the current folder].")] = None,
    device: Annotated[str, typer.Option(help=f"Where to time the backbones: {DEVICE_HELP}.")] = "auto",
    precision: Annotated[str, typer.Option(help=f"As for extract: {PRECISION_HELP}.")] = "auto",
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="As for extract [default: on with CUDA, off on the CPU].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Views per batch (0: extract's default, 256 on GPU, 32 on CPU).")] = 0,
    batches: Annotated[int, typer.Option(help="Timed batches per backbone, after warm-up.", min=1)] = 3,
    workers: Annotated[int, typer.Option(help="Decoding workers to plan and time (-1: extract's default).")] = -1,
) -> None:
    """Check this machine for extraction and project how long it takes.

    Prints torch/CUDA/cuDNN versions, the GPU and its bf16 support, whether torch.compile works,
    the FAISS build, /dev/shm, HDF5 file locking, free disk against the store's size, the weights
    and their hashes; then times a few batches of each backbone and projects the extraction time.
    Exits 1 when a check fails.
    """
    from .doctor import run_doctor

    with _expected_failures():
        report = run_doctor(
            data_dir, backbones=backbone or ["streetclip", "convnextv2-large"], weights=_parse_weights(weights),
            store_dir=store, device=device, precision=precision, compile=compile, batch_size=batch_size,
            batches=batches, workers=workers,
        )
    typer.echo(report.table())
    if report.failed:
        raise typer.Exit(1)


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


HeadsOption = Annotated[Path, typer.Option("--heads", help="Folder of trained heads: HEADS/PRESET/MEMBER/ and HEADS/PRESET/ensemble/.")]
PresetOption = Annotated[str, typer.Option(help="Head recipe: default (recommended) or seed (the reference design on cached features).")]
DeviceOption = Annotated[str, typer.Option(help=f"Where the heads run: {DEVICE_HELP}.")]
SeedOption = Annotated[int, typer.Option(help="Random seed of the folds and the training (deterministic on the CPU for a seed).")]
FoldsOption = Annotated[int, typer.Option(help="K of the cross-fitting: every member trains K models, each early-stopped on the fold it left out.", min=2)]
BackbonesOption = Annotated[list[str], typer.Option("--backbone", "-b", help="Backbones, in order (the seed preset gives the first one its StreetCLIP role); repeat. Default: every backbone in the store.")]


def _plan(store_dir: Path, heads: Path, preset: str, backbones: list[str], folds: int):
    """The store's data (each split read once) and the preset's recipe for the chosen backbones."""
    import dataclasses

    from .extract.backbones import get_spec
    from .heads.presets import recipe
    from .stages import HeadPaths, StoreData

    data = StoreData(store_dir, [get_spec(b).name for b in backbones] if backbones else None)
    return data, HeadPaths(heads, preset), dataclasses.replace(recipe(preset, data.backbones), folds=folds)


@app.command()
def train(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    backbone: BackbonesOption = [],
    member: Annotated[list[str], typer.Option(help="Train only this member of the recipe (repeat), e.g. classifier-streetclip or probe-streetclip+convnextv2-large.")] = [],
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    folds: FoldsOption = 5,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
) -> None:
    """Train the preset's ensemble members on cached features: a classifier per backbone and, in the
    default preset, a logistic probe on all of them. Each is cross-fitted over K folds.

    The first head trained on a store fixes the validation split (STORE_DIR/validation_split.json,
    10% of each state) that every later head shares; it is held out from every fit and every choice.
    """
    from .stages import train_members_stage

    with _expected_failures():
        data, paths, plan = _plan(store_dir, heads, preset, backbone, folds)
        results = train_members_stage(data, paths, plan, names=member or None, device=device, seed=seed)
    for r in results:
        typer.echo(f"{r.name} -> {r.out_dir}: out-of-fold score {r.oof['score']:.4f}, top-1 {r.oof['top1_accuracy']:.4f}, "
                   f"NLL {r.oof['nll']:.4f} ({r.seconds:.1f} s)")


@app.command()
def ensemble(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    backbone: BackbonesOption = [],
    member: Annotated[list[str], typer.Option(help="The trained members to combine (repeat); default: every trained member of the preset's recipe.")] = [],
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    folds: FoldsOption = 5,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
) -> None:
    """Fit the ensemble of any number of trained members on their out-of-fold outputs: a temperature per
    member, weights on the simplex (minimum NLL), the residual regressor, and the decoding (expected
    distance, retrieval share), each kept only where it wins out of fold.
    """
    from .stages import fit_ensemble_stage

    with _expected_failures():
        data, paths, plan = _plan(store_dir, heads, preset, backbone, folds)
        result = fit_ensemble_stage(data, paths, plan, members=member or None, device=device, seed=seed)
    typer.echo(f"ensemble -> {result.out_dir}: out-of-fold score {result.oof['ensemble']['score']:.4f} "
               f"(slightly optimistic: these rows chose the weights)")
    for name, w, t in zip(result.members, result.weights, result.temperatures):
        typer.echo(f"  {name:<40} weight {w:.3f}  temperature {t:.3f}  out-of-fold score {result.oof[name]['score']:.4f}")
    typer.echo(f"  regressor {'kept' if result.regressor else 'left out'}; decoding: {result.decode['candidates']} candidate "
               f"cell(s), retrieval share {result.decode['retrieval_weight']:g}")
    typer.echo(f"  flip TTA: {result.flip_tta_note}")


@app.command()
def evaluate(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    backbone: BackbonesOption = [],
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    folds: FoldsOption = 5,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
    split: Annotated[str, typer.Option(help="validation (held out from every choice), or test where the data folder has test_ground_truth.csv (synthetic data).")] = "validation",
) -> None:
    """Print every metric for the trivial baseline, each member alone and the ensemble."""
    from .stages import evaluate_stage

    with _expected_failures():
        if split not in ("validation", "test"):
            raise ConfigError(f"--split {split!r}; choose validation or test")
        data, paths, plan = _plan(store_dir, heads, preset, backbone, folds)
        typer.echo(evaluate_stage(data, paths, plan, device=device, seed=seed, split=split).table())


@app.command()
def predict(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder (with test features).")],
    out: Annotated[Path, typer.Option(help="Submission CSV to write.")] = Path("submission.csv"),
    backbone: BackbonesOption = [],
    heads: HeadsOption = Path("heads"),
    preset: PresetOption = "default",
    folds: FoldsOption = 5,
    template: Annotated[Optional[Path], typer.Option(help="sample_submission.csv to fill (default: the store's data folder's).")] = None,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
) -> None:
    """Write a competition submission for the test split from the fitted ensemble.

    Top-5 as original state_idx, latitude/longitude, every template column; checked by the
    competition's rules before it is written.
    """
    from .stages import predict_stage

    with _expected_failures():
        data, paths, plan = _plan(store_dir, heads, preset, backbone, folds)
        frame = predict_stage(data, paths, plan, out, device=device, seed=seed, template=template)
    typer.echo(f"wrote {out} ({frame.height} locations)")


@app.command()
def ablate(
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder.")],
    work: Annotated[Path, typer.Option(help="Folder for the heads (WORK/ablation/) and the table (WORK/eval/ablation.json, shown by `geoscout report WORK`).")] = Path("ablation-work"),
    backbone: BackbonesOption = [],
    seeds: Annotated[int, typer.Option(help="Training seeds per recipe.", min=1)] = 3,
    recipe: Annotated[list[str], typer.Option("--recipe", "-r", help="Only these recipes, by their names in the table (repeat), e.g. -r default -r 'default + multi-layer features'. Default: all.")] = [],
    device: DeviceOption = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default; 1 keeps timings steady on a busy machine).")] = 0,
) -> None:
    """Train the seed recipe, the default, and the default without each of its parts (the probe, the
    classifiers, haversine smoothing, geocells, view dropout, the regressor, retrieval, expected-distance
    decoding, fitted weights) over seeds; print mean ± std tables.

    Scored on the validation rows and, for synthetic data (test_ground_truth.csv), on the test split.
    """
    import torch

    from .ablation import markdown_table, run_ablation
    from .extract.backbones import get_spec

    if threads:
        torch.set_num_threads(threads)
    with _expected_failures():
        result = run_ablation(store_dir, work_dir=work, seeds=seeds, device=device,
                              backbones=[get_spec(b).name for b in backbone] or None, only=recipe or None)
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
    backbones: Annotated[Optional[str], typer.Option(help="Comma-separated backbones, any number, in order [default: streetclip,convnextv2-large].")] = None,
    weights: Annotated[list[str], typer.Option(help="BACKBONE=PATH or BACKBONE=HUB_ID (repeat).")] = [],
    preset: Annotated[list[str], typer.Option(help="Head recipe(s); the first writes the submission; repeat to compare [default: default].")] = [],
    device: Annotated[Optional[str], typer.Option(help=f"{DEVICE_HELP} [default: auto].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Extraction batch size in views.")] = None,
    bad_images: Annotated[Optional[str], typer.Option(help="fail or mask.")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip", help="Also extract mirrored views for flip test-time augmentation (twice the extraction work).")] = None,
    precision: Annotated[Optional[str], typer.Option(help=f"Backbone precision: {PRECISION_HELP} [default: auto].")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the backbones [default: on with CUDA, off on the CPU].")] = None,
    folds: Annotated[Optional[int], typer.Option(help="K of the heads' cross-fitting [default: 5].", min=2)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed of the split, folds and training [default: 0].")] = None,
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
        bad_images=bad_images, flip=flip, folds=folds, seed=seed, precision=precision, compile=compile,
    )
    with _expected_failures():
        if config is not None:
            cfg = RunConfig.from_toml(config, **overrides)
        else:
            if data_dir is None or work is None:
                raise typer.BadParameter("give DATA_DIR and --work (or --config)")
            cfg = RunConfig(**{k: v for k, v in overrides.items() if v is not None})
        result = run_pipeline(cfg)
    typer.echo("validation rows (held out from every choice):")
    typer.echo(score_table(result.scores))
    if result.test_scores:
        typer.echo("test split (its truth is known: synthetic data):")
        typer.echo(score_table(result.test_scores))


@app.command()
def locate(
    images: Annotated[Optional[list[str]], typer.Argument(help="Four photos in the order north, east, south, west; '-' for a view there is no photo of (at least one is needed).", show_default=False)] = None,
    work: Annotated[Path, typer.Option(help="The work folder of a finished `geoscout run` (its final preset answers).", show_default=False)] = ...,
    csv: Annotated[Optional[Path], typer.Option(help="Batch mode: a CSV of locations with columns image_north, image_east, image_south, image_west (paths relative to --images-dir, or absolute; empty or '-' for a missing view; other columns, e.g. sample_id, are copied to the output). The competition's sample_submission.csv is one.")] = None,
    images_dir: Annotated[Optional[Path], typer.Option(help="Batch mode: the folder the CSV's relative image paths start from, e.g. DATA/test_images for sample_submission.csv.", show_default="the CSV's folder")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Batch mode: the predictions CSV to write.", show_default="NAME.located.csv beside the --csv file")] = None,
    top: Annotated[int, typer.Option(help="How many states to list (the first five are the submission's top-5).", min=1)] = 5,
    neighbours: Annotated[int, typer.Option(help="Nearest training locations to list.", min=0)] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write a one-page card: the photos, a map with the state borders, the top states, the neighbours.", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help=f"Where the backbones and heads run: {DEVICE_HELP}.", show_default="the run's")] = None,
    weights: Annotated[list[str], typer.Option(help="BACKBONE=PATH (repeat): where the run's weights are now, when not at the path its config.toml names. Checked like those: weights other than the run's are refused.")] = [],
) -> None:
    """Where are these photos? The run's final model on four new images (or on every row of --csv).

    Prints the top states with their probabilities (names and the competition's state_idx), the
    latitude and longitude, the radius in km holding 50% and 90% of the model's probability, and
    the nearest training locations. The radius is the smallest circle around the answer whose
    geocells (the ensemble's cells, each counted at its centroid) hold that share of the ensemble's
    probability. Neighbours are the training locations whose mean embedded view (centred on the
    training mean, every backbone of the model) has the highest cosine with this location's; their
    km are from the answer.

    The images are decoded, resized and embedded exactly as the run's store was: same backbones,
    weights, precision and preprocessing. Each backbone is loaded once and fingerprinted as the
    store fingerprints it; weights (or preprocessing) other than the store's are refused, naming
    the backbone and both fingerprints. A test location's four files give its submission row.
    """
    from .locate import locate as locate_one
    from .locate import locate_csv

    if (csv is None) == (not images):
        raise typer.BadParameter("give four images (north east south west) or --csv FILE, not both")
    if csv is not None and (html is not None or as_json):
        raise typer.BadParameter("--html and --json describe one location; with --csv the predictions go to --out")
    if csv is None and (out is not None or images_dir is not None):
        raise typer.BadParameter("--out and --images-dir are for --csv; one location prints its answer (--json, --html)")
    with _expected_failures():
        named = _parse_weights(weights)
        if csv is not None:
            path, frame = locate_csv(work, csv, out, images_dir=images_dir, top=top, device=device, weights=named)
            typer.echo(f"wrote {path} ({frame.height} locations)")
            return
        found = locate_one(work, images, top=top, neighbours=neighbours, device=device, weights=named)
        if html is not None:
            from .card import write_card

            written = write_card(found, html)
    if as_json:
        typer.echo(json.dumps(found.to_json(), indent=2))
    else:
        model = found.model
        typer.echo(f"geoscout locate: {model['work_dir']}, preset {model['preset']}, backbones {', '.join(model['backbones'])}")
        typer.echo(found.table())
    if html is not None:
        typer.echo(f"wrote {written}", err=as_json)


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
