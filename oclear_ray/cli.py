"""The ``oclear`` command line: one command per stage, each calling the same library functions
as the Ray jobs in ``jobs/``."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Image-to-multi-modal retrieval on Ray.", no_args_is_help=True, add_completion=False
)
console = Console(stderr=True)

RayAddress = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address; default: embedded Ray.")
]


@contextmanager
def progress_bar(description: str, total: int | None = None, *, cumulative: bool = False):
    """A rich progress bar; yields a callback taking rows just done (or done so far, when
    ``cumulative``)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        if cumulative:
            yield lambda n: bar.update(task, completed=n)
        else:
            yield lambda n: bar.advance(task, n)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the catalog and queries to.")],
    docs: int = typer.Option(2000, help="Catalog documents."),
    classes: int = typer.Option(300, help="Product classes."),
    noise: float = typer.Option(0.0, help="Fraction of documents with a wrong label."),
    alias_rate: float = typer.Option(0.05, help="Fraction of products split over two labels."),
    broad_rate: float = typer.Option(0.05, help="Fraction of labels covering two products."),
    zipf: float = typer.Option(1.0, help="Zipf exponent of the class sizes."),
    queries_per_class: int = typer.Option(2, help="Query photos drawn per product."),
    text_query_rate: float = typer.Option(0.0, help="Fraction of queries with typed text."),
    image_size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
):
    """Draw a synthetic product catalog with user-photo queries and a truth file."""
    from oclear_ray.synth import SynthConfig, generate

    cfg = SynthConfig(
        docs=docs,
        classes=classes,
        noise=noise,
        alias_rate=alias_rate,
        broad_rate=broad_rate,
        zipf=zipf,
        image_size=image_size,
        seed=seed,
    )
    with progress_bar("synth", cfg.total_items, cumulative=True) as done:
        summary = generate(str(out_dir), cfg, progress=done)
    console.print_json(json.dumps(summary, default=str))


@app.command()
def validate(
    path: Annotated[str, typer.Argument(help="Catalog or queries: parquet, manifest, or .tar.")],
    kind: str = typer.Option("auto", help="catalog, queries, or auto (from the columns)."),
    format: str | None = typer.Option(
        None, help="parquet, manifest or webdataset; default: guess."
    ),
    workdir: str = typer.Option("work", help="Work directory (quarantine in WORKDIR/quarantine/)."),
    quarantine: str | None = typer.Option(None, help="Quarantine parquet (overrides workdir)."),
    max_pixels: int = typer.Option(40_000_000, help="Images with more pixels are quarantined."),
    address: RayAddress = None,
):
    """Check a data set against the contract through Ray Data; exit 0 when usable."""
    from oclear_ray.contract import Limits, SchemaError
    from oclear_ray.read import validate_source
    from oclear_ray.runtime import init_ray

    init_ray(address)
    try:
        with progress_bar(f"validate {os.path.basename(path.rstrip('/'))}") as advance:
            report = validate_source(
                path,
                kind=kind,
                format=format,
                workdir=workdir,
                quarantine=quarantine,
                limits=Limits(max_pixels=max_pixels),
                progress=advance,
            )
    except (SchemaError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    _print_report(report)
    raise typer.Exit(0 if report.usable else 1)


def _print_report(report) -> None:
    table = Table(title=f"{report.kind}: {report.rows} rows", min_width=44)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("good", str(report.good))
    table.add_row("labels", str(report.labels))
    for reason, n in sorted(report.reasons.items()):
        table.add_row(f"quarantined: {reason}", str(n))
    Console().print(table)
    Console().print(f"quarantine: {report.quarantine_path} ({report.quarantined} rows)")


@app.command()
def train(
    catalog: str = typer.Option(..., help="Catalog (parquet, manifest or webdataset)."),
    workdir: str = typer.Option(..., help="Work directory (model goes to WORKDIR/train/model)."),
    queries: str | None = typer.Option(None, help="Training query photos."),
    config: str | None = typer.Option(None, help="YAML training config."),
    workers: int | None = typer.Option(None, help="Ray Train workers."),
    steps: int | None = typer.Option(None, help="Scale the schedule to this many steps."),
    max_minutes: float | None = typer.Option(None, help="Stop cleanly after this long."),
    use_gpu: bool | None = typer.Option(None, "--use-gpu", help="One GPU per worker."),
    address: RayAddress = None,
):
    """Train the encoders (FSDP2) and the sharded classifier on Ray Train, then export them."""
    from oclear_ray.config import train_config
    from oclear_ray.runtime import init_ray
    from oclear_ray.train import fit

    cfg = train_config(
        config, workers=workers, steps=steps, max_minutes=max_minutes, use_gpu=use_gpu
    )
    init_ray(address)
    result = fit(cfg, catalog=catalog, queries=queries, workdir=workdir)
    console.print(f"model: {result.model_dir} ({result.num_classes} classes)")
    if result.metrics:
        console.print_json(json.dumps(result.metrics))
