"""The geoscout command line: each command parses its arguments and calls one plain function."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .problems import InputError

app = typer.Typer(
    help="geoscout: where in the USA is this street view? Feature store + lightweight heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextmanager
def _expected_failures():
    """Bad input is the user's to fix: print what is wrong, exit 1, no traceback."""
    try:
        yield
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


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


def _parse_weights(items: list[str]) -> dict[str, str]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise typer.BadParameter(f"{item!r}: expected BACKBONE=PATH_OR_HUB_ID, e.g. streetclip=/models/StreetCLIP")
        weights[name] = value
    return weights


@app.command()
def extract(
    data_dir: Annotated[Path, typer.Argument(help="Competition folder.")],
    store_dir: Annotated[Path, typer.Argument(help="Feature store folder (created; resumed if it exists).")],
    backbone: Annotated[list[str], typer.Option("--backbone", "-b", help="Backbone(s) to embed with; repeat for several (each view is decoded once for all). See `geoscout backbones`.")],
    weights: Annotated[list[str], typer.Option(help="BACKBONE=PATH or BACKBONE=HUB_ID: a HuggingFace StreetCLIP folder, a timm checkpoint file, or a hub id when online. Required for real backbones.")] = [],
    split: Annotated[list[str], typer.Option(help="Split(s) to embed: train, test.")] = ["train", "test"],
    device: Annotated[str, typer.Option(help="cuda, cuda:N, cpu or auto; cuda falls back to cpu with a warning.")] = "cuda",
    batch_size: Annotated[int, typer.Option(help="Views per forward pass (0: 256 on GPU, 64 on CPU).")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader decoding processes (-1: up to 8).")] = -1,
    bad_images: Annotated[str, typer.Option(help="fail: stop on a bad image; mask: mask the view, log it, carry on.")] = "fail",
    shard_size: Annotated[int, typer.Option(help="Locations per crash-safe shard.")] = 1024,
    compile: Annotated[bool, typer.Option(help="torch.compile the backbones (faster on long runs).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace stores made with other weights or preprocessing.")] = False,
) -> None:
    """Embed every view with frozen backbones into an HDF5 feature store.

    Resumable: rerun the same command after a crash and it finishes the job. Multi-GPU:
    `torchrun --nproc-per-node K -m geoscout.cli extract ...`.
    """
    from .extract.runner import extract as run_extract

    with _expected_failures():
        result = run_extract(
            data_dir, store_dir, backbones=backbone, weights=_parse_weights(weights), splits=tuple(split),
            device=device, batch_size=batch_size, workers=workers, bad_images=bad_images, shard_size=shard_size,
            compile=compile, overwrite=overwrite,
        )
    for item in result.written:
        typer.echo(f"wrote {item}")
    for item in result.skipped:
        typer.echo(f"already complete: {item}")


@app.command()
def backbones() -> None:
    """List the registered backbones with their input size, embedding size and weights source."""
    from .extract.backbones import BACKBONES

    for name, spec in BACKBONES.items():
        source = "random init (tests, demo)" if spec.random_init else f"weights: {spec.default_weights} or a local path"
        typer.echo(f"{name:<22} {spec.input_size:>4}px  {spec.embed_dim:>5}-d  {source}")


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


def main() -> None:  # `python -m geoscout.cli` (torchrun needs a module)
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
