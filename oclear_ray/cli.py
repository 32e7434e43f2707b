"""The ``oclear`` command line: one command per stage, each calling the same library functions
as the Ray jobs in ``jobs/``, which take the commands' options as declared here. Options named
as a config's fields become that config by name (:func:`config_from` of ``ctx.params``).

Every command goes through one error handler (:func:`command`): a bad input or config is one
red line naming it (exit 2), any other failure one red line naming its cause (exit 1), and the
traceback goes to the command's log file, ``WORKDIR/logs/<command>.log``. Unless ``--verbose``,
that file also takes everything Ray writes on the driver (workers' output stays in Ray's
session folder), and the terminal shows only the command's own progress lines and results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from oclear_ray.config import TrainConfig

app = typer.Typer(
    help="Image-to-multi-modal retrieval on Ray.", no_args_is_help=True, add_completion=False
)
console = Console(stderr=True, soft_wrap=True)  # progress, messages and errors
out = Console()  # results: tables

RayAddress = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address; default: embedded Ray.")
]
TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else WORKDIR/mlflow.",
    ),
]
Sets = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a training config field, e.g. --set optim.lr=1e-3 (repeatable).",
    ),
]
# the options several commands take alike
Catalog = Annotated[str, typer.Option(help="Catalog (parquet, manifest or webdataset).")]
TrainingQueries = Annotated[str | None, typer.Option(help="Training query photos.")]
ModelDir = Annotated[str | None, typer.Option(help="Exported model; default WORKDIR/train/model.")]
Format = Annotated[
    str | None, typer.Option(help="parquet, manifest or webdataset; default: guess.")
]
ConfigFile = Annotated[str | None, typer.Option(help="YAML training config.")]
Workers = Annotated[int | None, typer.Option(help="Ray Train workers.")]
UseGpu = Annotated[bool | None, typer.Option("--use-gpu", help="One GPU per worker.")]
CpusPerActor = Annotated[float, typer.Option(help="Ray CPUs per actor (may be fractional).")]


#: the app's own options, set by ``main`` before each command runs (typer keeps its own copy
#: of click, so the context is not reachable through ``click.get_current_context``)
_options = {"verbose": False}


@app.callback()
def main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Ray's own output on the terminal."
    ),
):
    """Image-to-multi-modal retrieval on Ray."""
    _options["verbose"] = verbose


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _verbose() -> bool:
    return _options["verbose"]


def command(name: str | None = None):
    """``app.command`` through the error handler, with Ray's output in the command's log."""

    def register(fn):
        @functools.wraps(fn)
        def run(**kwargs):
            from oclear_ray.runtime import log_dir, quiet_output

            where = kwargs.get("workdir") or kwargs.get("out_dir")
            log_file = os.path.join(log_dir(str(where) if where else None), f"{run_name}.log")
            terminals = nullcontext((sys.stdout, sys.stderr))
            ray_before = _ray_running()
            with terminals if _verbose() else quiet_output(log_file) as streams, _on(*streams):
                try:
                    return fn(**kwargs)
                except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    raise typer.Exit(_fail(exc, log_file)) from exc
                finally:
                    if not ray_before and _ray_running():  # its goodbyes into the log too
                        sys.modules["ray"].shutdown()

        run_name = name or fn.__name__
        return app.command(name=name)(run)

    return register


@contextmanager
def _on(stdout, stderr):
    """The consoles write to these streams (the terminal, while the process's own stdout and
    stderr go to the log)."""
    previous = out.file, console.file
    out.file, console.file = stdout, stderr
    try:
        yield
    finally:
        out.file, console.file = previous


def _fail(exc: BaseException, log_file: str) -> int:
    """Log the traceback, print one line naming the cause; the exit code (2: bad input or
    config, 1: a failure)."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    with open(log_file, "a") as f:
        traceback.print_exception(exc, file=f)
    cause = root_cause(exc)
    user_errors = [ValueError, FileNotFoundError]
    serve = sys.modules.get("oclear_ray.serve")  # not imported: only a loaded one raised it
    if serve is not None:
        user_errors.append(serve.VersionMismatch)
    user = isinstance(cause, tuple(user_errors))
    lines = str(cause).strip().splitlines() or [""]
    what = lines[0] if user else f"{type(cause).__name__}: {lines[0]}".rstrip(": ")
    message = escape(f"{what} (log: {log_file})")  # a message's brackets are not markup
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return 2 if user else 1


def root_cause(exc: BaseException) -> BaseException:
    """The exception a failure comes from: through Ray Train's worker and controller errors,
    Ray's task errors (their ``cause``) and what Ray raised ``from``; an error of ours that
    names the problem is kept, not the lower-level one it was raised from."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None) or {}
        from_ray = type(exc).__module__.split(".")[0] == "ray"
        inner = (
            next(iter(failures.values()), None)
            or getattr(exc, "controller_failure", None)
            or getattr(exc, "cause", None)
            or (exc.__cause__ if from_ray else None)
        )
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _init_ray(address: str | None = None):
    from oclear_ray.runtime import init_ray

    return init_ray(address, quiet=not _verbose(), logging_level=logging.INFO)


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


def config_from(cls, options: Mapping):
    """``cls`` (a config dataclass) from the options named as its fields, its other fields at
    their defaults: how the commands, the Ray jobs and the benches turn options into a config."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in options.items() if key in names})


def training_config(options: Mapping) -> TrainConfig:
    """The training config that ``--config`` and, where a command has them, ``--workers``,
    ``--steps``, ``--max-minutes``, ``--use-gpu`` and ``--set`` ask for (``train``,
    ``pipeline``, ``demo`` and their jobs)."""
    from oclear_ray.config import train_config

    sizes = {key: options.get(key) for key in ("workers", "steps", "max_minutes", "use_gpu")}
    return train_config(options["config"], sets=options.get("set_"), **sizes)


def ids_to_delete(delete: list[str] | None, delete_file: Path | str | None) -> list[str]:
    """The doc_ids of ``--delete`` and of ``--delete-file`` (one a line)."""
    ids = list(delete or [])
    if delete_file is not None:
        ids += [line.strip() for line in Path(delete_file).read_text().splitlines() if line.strip()]
    return ids


@command()
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
    *,
    ctx: typer.Context,
):
    """Draw a synthetic product catalog with user-photo queries and a truth file."""
    from oclear_ray.synth import SynthConfig, generate

    cfg = config_from(SynthConfig, ctx.params)
    with progress_bar("synth", cfg.total_items, cumulative=True) as done:
        summary = generate(str(out_dir), cfg, progress=done)
    console.print_json(json.dumps(summary, default=str))


@command()
def validate(
    path: Annotated[str, typer.Argument(help="Catalog or queries: parquet, manifest, or .tar.")],
    kind: str = typer.Option("auto", help="catalog, queries, or auto (from the columns)."),
    format: Format = None,
    workdir: str = typer.Option("work", help="Work directory (quarantine in WORKDIR/quarantine/)."),
    quarantine: str | None = typer.Option(None, help="Quarantine parquet (overrides workdir)."),
    max_pixels: int = typer.Option(40_000_000, help="Images with more pixels are quarantined."),
    address: RayAddress = None,
):
    """Check a data set against the contract through Ray Data; exit 0 when usable."""
    from oclear_ray.contract import Limits
    from oclear_ray.read import validate_source

    _init_ray(address)
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
    out.print(table)
    out.print(f"quarantine: {report.quarantine_path} ({report.quarantined} rows)")


@command()
def govern(
    catalog: Catalog,
    workdir: str = typer.Option(..., help="Work directory (class map goes to WORKDIR/govern)."),
    queries: str | None = typer.Option(None, help="Query set whose labels are checked."),
    model_dir: str | None = typer.Option(
        None, "--model", help="Exported model: add its document embeddings to the features."
    ),
    policy: str = typer.Option("none", help="Sampling for training: none, sqrt or balanced."),
    cap: int | None = typer.Option(None, help="Most draws of one class per epoch."),
    truth: Annotated[
        Path | None, typer.Option(help="oclear synth truth.json to score against.")
    ] = None,
    review: str | None = typer.Option(
        None,
        help="Review file (YAML or JSON): decision ids from report.html to 'reject' (undone) "
        "and optionally 'accept'.",
    ),
    address: RayAddress = None,
):
    """Organise the classes: skew and sampling, noisy labels, merges and splits -> class map
    and report.html, a page to review the decisions by (then rerun with --review)."""
    from oclear_ray import storage
    from oclear_ray.classmap import load_class_map
    from oclear_ray.govern import GovernConfig, score_against_truth
    from oclear_ray.govern import govern as run_govern
    from oclear_ray.review import load_review

    config = GovernConfig(policy=policy, cap=cap)
    verdict = load_review(review) if review else None
    _init_ray(address)
    with progress_bar("govern: validate") as advance:
        result = run_govern(
            catalog,
            workdir,
            config=config,
            model_dir=model_dir,
            queries=queries,
            review=verdict,
            progress=advance,
        )
    console.print(storage.read_bytes(storage.join(workdir, "govern", "report.md")).decode())
    console.print(f"class map: {result.class_map_path} (version {result.version})")
    console.print(f"review: {storage.join(workdir, 'govern', 'report.html')}")
    if truth is not None:
        class_map = load_class_map(result.class_map_path)
        scores = score_against_truth(class_map, json.loads(truth.read_text()))
        console.print_json(json.dumps(scores))


@command()
def train(
    catalog: Catalog,
    workdir: str = typer.Option(..., help="Work directory (model goes to WORKDIR/train/model)."),
    queries: TrainingQueries = None,
    class_map: str | None = typer.Option(
        None, help="Class map from oclear govern; default WORKDIR/govern/class_map.json if any."
    ),
    config: ConfigFile = None,
    workers: Workers = None,
    steps: int | None = typer.Option(None, help="Scale the schedule to this many steps."),
    max_minutes: float | None = typer.Option(None, help="Stop cleanly after this long."),
    use_gpu: UseGpu = None,
    set_: Sets = None,
    tracking_uri: TrackingUri = None,
    address: RayAddress = None,
    *,
    ctx: typer.Context,
):
    """Train the encoders (FSDP2) and the sharded classifier on Ray Train, then export them."""
    from oclear_ray.tracking import tracking_for
    from oclear_ray.train import fit

    cfg = training_config(ctx.params)
    _init_ray(address)
    with StageLines() as lines:
        lines.start("train", cfg.total_steps)
        tick = lines.callback("train")
        result = fit(
            cfg,
            catalog=catalog,
            queries=queries,
            workdir=workdir,
            class_map=class_map,
            tracking=tracking_for(workdir, tracking_uri),
            progress=tick,
            on_report=tick,
        )
        lines.finish("train", f"{result.steps} steps")
    console.print(f"model: {result.model_dir} ({result.num_classes} classes)")
    if result.metrics:
        console.print_json(json.dumps(result.metrics))


@command()
def embed(
    catalog: Catalog,
    workdir: str = typer.Option(..., help="Work directory (embeddings go to WORKDIR/embed)."),
    model_dir: ModelDir = None,
    format: Format = None,
    actors: int = typer.Option(1, help="Embedding actors (each loads the encoder once)."),
    cpus_per_actor: CpusPerActor = 1.0,
    threads_per_actor: int | None = typer.Option(
        None, help="Torch threads per actor; default: its whole CPUs."
    ),
    batch_size: int = typer.Option(64, help="Documents per encoder call."),
    rows_per_part: int = typer.Option(10_000, help="Rows per output part (the resume unit)."),
    use_gpu: bool | None = typer.Option(
        None, "--use-gpu/--no-gpu", help="One GPU per actor; default: when the cluster has GPUs."
    ),
    doc_view: str | None = typer.Option(
        None,
        help="Embed documents 'fused' or 'image_only' instead of the model's own view "
        "(the fusion ablation).",
    ),
    address: RayAddress = None,
    *,
    ctx: typer.Context,
):
    """Embed a catalog with the document encoder into WORKDIR/embed; a rerun resumes."""
    from oclear_ray.embed import EmbedConfig, embed_catalog

    config = config_from(EmbedConfig, ctx.params)
    _init_ray(address)
    with progress_bar("embed") as advance:
        result = embed_catalog(
            catalog, workdir, model_dir=model_dir, config=config, format=format, progress=advance
        )
    console.print_json(json.dumps(vars(result)))


@command()
def index(
    workdir: str = typer.Option(..., help="Work directory (reads WORKDIR/embed)."),
    shards: int | None = typer.Option(None, help="FAISS shards; default: as built, else 1."),
    factory: str | None = typer.Option(None, help="FAISS factory string; default: automatic."),
    memory_gb: float = typer.Option(8.0, help="Memory budget of all shards (automatic type)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild from the embeddings."),
    rebuild_fraction: float = typer.Option(
        0.3, help="Rebuild when changes since the build pass this share."
    ),
    delete: Annotated[
        list[str] | None, typer.Option("--delete", help="doc_id to delete (repeatable).")
    ] = None,
    delete_file: Annotated[
        Path | None, typer.Option(help="File of doc_ids to delete, one a line.")
    ] = None,
    address: RayAddress = None,
    *,
    ctx: typer.Context,
):
    """Build the FAISS shards from WORKDIR/embed, or bring them up to date."""
    from oclear_ray.index import IndexConfig, sync_index

    config, ids = config_from(IndexConfig, ctx.params), ids_to_delete(delete, delete_file)
    _init_ray(address)
    with console.status("index"):
        result = sync_index(workdir, config, rebuild=rebuild, delete=ids)
    console.print_json(json.dumps(result.to_dict()))


@command(name="eval")
def eval_(
    workdir: str = typer.Option(..., help="Work directory (report goes to WORKDIR/eval)."),
    queries: str = typer.Option(..., help="Labelled queries (parquet, manifest or webdataset)."),
    model_dir: ModelDir = None,
    catalog: str | None = typer.Option(None, help="Catalog for thumbnails; default: as embedded."),
    format: str | None = typer.Option(None, help="Format of the queries; default: guess."),
    image_only_docs: bool = typer.Option(
        False, "--image-only-docs", help="Also measure image-only vs fused documents (exact)."
    ),
    judgments: str | None = typer.Option(
        None, help="Relevance judgments (JSON query_id -> [doc_id, ...]) instead of labels."
    ),
    actors: int = typer.Option(1, help="Query-encoder actors."),
    cpus_per_actor: CpusPerActor = 0.5,
    threads_per_actor: int = typer.Option(2, help="Torch threads per actor."),
    grid_queries: int = typer.Option(24, help="Queries shown with their top documents."),
    tracking_uri: TrackingUri = None,
    address: RayAddress = None,
    *,
    ctx: typer.Context,
):
    """Embed labelled queries, search the index; write WORKDIR/eval/report.json and .html."""
    from oclear_ray import storage
    from oclear_ray.embed import EmbedConfig
    from oclear_ray.evaluate import EvalConfig, evaluate
    from oclear_ray.tracking import tracking_for

    pool = config_from(EmbedConfig, ctx.params)
    _init_ray(address)
    with console.status("eval"):
        report = evaluate(
            workdir,
            queries,
            model_dir=model_dir,
            config=EvalConfig(pool=pool, grid_queries=grid_queries),
            format=format,
            catalog=catalog,
            image_only_docs=image_only_docs,
            tracking=tracking_for(workdir, tracking_uri),
            judgments=judgments,
        )
    basis = f"judged in {judgments}" if judgments else "by label"
    title = f"{report['n_queries']} queries, {report['n_documents']} documents, hits {basis}"
    table = Table(title=title)
    for column in ("search", "recall@1", "recall@5", "recall@10", "map@r", "ndcg@10"):
        table.add_column(column, justify="left" if column == "search" else "right")
    rows = {"ANN": report, "exact": report["exact"], **report.get("fusion_ablation", {})}
    for name, row in rows.items():
        if isinstance(row, dict):
            cells = (row[c] for c in ("recall@1", "recall@5", "recall@10", "map@r", "ndcg@10"))
            table.add_row(name, *(f"{v:.4f}" for v in cells))
    out.print(table)
    console.print(f"ANN vs exact recall@10: {report['ann_vs_exact']['recall@10']:.4f}")
    console.print(f"report: {storage.join(workdir, 'eval', 'report.html')}")


@command()
def search(
    images: Annotated[list[Path] | None, typer.Argument(help="Query photos.")] = None,
    workdir: str = typer.Option(..., help="Work directory (WORKDIR/index, WORKDIR/train/model)."),
    text: str | None = typer.Option(None, help="Typed query: with each photo, or alone."),
    k: int = typer.Option(10, help="Documents per query."),
    model_dir: ModelDir = None,
):
    """Embed query photos and/or a text with the query encoder; print the top documents."""
    from oclear_ray import storage
    from oclear_ray.export import load_query_encoder
    from oclear_ray.search import SearchIndex

    if not images and not text:
        raise ValueError("give query photos, --text, or both")
    encoder = load_query_encoder(model_dir or storage.join(workdir, "train", "model"))
    found = SearchIndex.load(
        storage.join(workdir, "index"), expected_model_version=encoder.model_version
    )
    photos = [p.read_bytes() for p in images or []]
    texts = [text] * max(1, len(photos)) if text else None
    xq = encoder.encode_query(images=photos or None, texts=texts).float().numpy()
    names = [str(p) for p in images or []] or [f"text {text!r}"]
    for name, hits in zip(names, found.search_documents(xq, k), strict=True):
        _print_hits(name, hits)


@command()
def serve(
    workdir: str = typer.Option(..., help="Work directory (WORKDIR/index, WORKDIR/train/model)."),
    model_dir: ModelDir = None,
    host: str = typer.Option("127.0.0.1", help="HTTP host (0.0.0.0 to listen on all)."),
    port: int = typer.Option(8000, help="HTTP port."),
    shard_replicas: int = typer.Option(1, help="Replicas per index shard deployment."),
    max_batch_size: int = typer.Option(16, help="Query encoder dynamic batch size."),
    num_gpus: float = typer.Option(
        0, help="GPUs per query-encoder replica (> 0: the encoder runs on CUDA, half precision)."
    ),
    address: RayAddress = None,
):
    """Serve the search app (page at /, API at /v1/...) with Ray Serve until interrupted."""
    from oclear_ray.serve import Paths, check_versions

    check_versions(Paths.of(workdir, model_dir))
    _init_ray(address)
    url = _start_app(
        workdir,
        model_dir,
        host,
        port,
        shard_replicas=shard_replicas,
        max_batch_size=max_batch_size,
        num_gpus=num_gpus,
    )
    console.print(f"serving on {url}/ (Ctrl-C to stop)")
    _serve_forever()


@command()
def pipeline(
    catalog: Catalog,
    workdir: str = typer.Option(..., help="Work directory for every stage's artifacts."),
    queries: TrainingQueries = None,
    eval_queries: str | None = typer.Option(None, help="Labelled queries to evaluate on."),
    eval_judgments: str | None = typer.Option(
        None, help="Relevance judgments of the eval queries (JSON query_id -> [doc_id, ...])."
    ),
    config: ConfigFile = None,
    workers: Workers = None,
    steps: int | None = typer.Option(None, help="Scale the training schedule to this many steps."),
    max_minutes: float | None = typer.Option(None, help="Training wall-time budget."),
    use_gpu: UseGpu = None,
    govern: str = typer.Option(
        "auto",
        help="auto (apply the class map when a probe training says it helps), apply, report "
        "(write it, train on the raw labels) or off.",
    ),
    fusion_ablation: bool = typer.Option(
        False, "--fusion-ablation", help="Also evaluate image-only document embeddings."
    ),
    views: str = typer.Option(
        "class",
        help="How training queries are held out to choose the document view and shape weight: "
        "class (unseen classes), photo (new photos of seen ones) or off.",
    ),
    set_: Sets = None,
    tracking_uri: TrackingUri = None,
    address: RayAddress = None,
    *,
    ctx: typer.Context,
):
    """govern -> train -> embed -> index -> evaluate, skipping every stage that is current."""
    from oclear_ray.pipeline import GOVERN_MODES, PipelineConfig
    from oclear_ray.tracking import tracking_for

    if govern not in GOVERN_MODES:
        raise ValueError(f"--govern must be one of {GOVERN_MODES}, got {govern!r}")
    cfg = PipelineConfig(
        catalog=catalog,
        workdir=workdir,
        queries=queries,
        eval_queries=eval_queries,
        eval_judgments=eval_judgments,
        train=training_config(ctx.params),
        fusion_ablation=fusion_ablation,
        govern_mode=govern,
        views=views,
        tracking=tracking_for(workdir, tracking_uri),
    )
    _init_ray(address)
    _run_stages(cfg)


@command()
def demo(
    workdir: str = typer.Option("runs/demo", help="Work directory (data in WORKDIR/data)."),
    docs: int = typer.Option(400, help="Synthetic documents."),
    classes: int = typer.Option(40, help="Synthetic products."),
    queries_per_class: int = typer.Option(8, help="Photos per product (half the products)."),
    steps: int | None = typer.Option(None, help="Training steps (default: fill --max-minutes)."),
    max_minutes: float = typer.Option(4.0, help="Training wall-time budget: the schedule."),
    config: ConfigFile = None,
    workers: Workers = None,
    host: str = typer.Option("127.0.0.1", help="HTTP host of the search page."),
    port: int = typer.Option(8000, help="HTTP port of the search page."),
    once: bool = typer.Option(False, "--once", help="Stop after the first search answers."),
    set_: Sets = None,
    tracking_uri: TrackingUri = None,
    *,
    ctx: typer.Context,
):
    """Synthesize a small catalog, run the whole pipeline on it (evaluated on new photos of
    catalog products, and on products never photographed), serve the search page and search it
    once with a new photo of a catalog product. Without ``--config`` it trains the demo's
    recipe (``demo.RECIPE``: a ResNet at 32 px, photo-like views of documents and photos)."""
    from oclear_ray import demo as steps_of
    from oclear_ray.pipeline import PipelineConfig
    from oclear_ray.tracking import tracking_for

    options = dict(ctx.params)
    if config is None:
        options["set_"] = [*steps_of.RECIPE, *(set_ or [])]

    with console.status("demo: drawing the synthetic catalog"):
        data = steps_of.ensure_data(
            workdir, docs=docs, classes=classes, queries_per_class=queries_per_class
        )
    cfg = PipelineConfig(
        catalog=data["catalog"],
        workdir=workdir,
        queries=data["queries"],
        eval_queries=data["new_photos"],
        # a hit is a document of the photographed product (labels carry the planted noise)
        eval_judgments=data["new_photos_judgments"],
        train=training_config(options),
        # its catalog has planted label noise that governance is measured to fix
        # (bench/governance.py); a probe would double the demo's training time
        govern_mode="apply",
        # its users photograph products training saw: the view is chosen on new photos of them
        views="photo",
        tracking=tracking_for(workdir, tracking_uri),
    )
    _init_ray()
    results = _run_stages(cfg)
    with console.status("eval: products never photographed"):
        held = steps_of.evaluate_held_out(cfg, data["eval_queries"], data["eval_queries_judgments"])
    new = results["evaluate"].output
    console.print(
        f"R@1 {new['recall@1']:.3f} on {new['n_queries']} new photos of catalog products; "
        f"R@1 {held['recall@1']:.3f} on {held['n_queries']} photos of products never "
        f"photographed in training ({workdir}/{steps_of.HELD_OUT_DIR}/report.html); a hit is "
        "a document of the photographed product"
    )
    with console.status("serve: starting the search app"):
        url = _start_app(workdir, None, host, port)
        steps_of.wait_ready(url)
    _search_once(data, url)
    console.print(f"search page: {url}/  (API: {url}/v1/search, {url}/v1/info)")
    if once:
        _stop_app()
        return
    console.print("serving until Ctrl-C")
    _serve_forever()


def _search_once(data: dict, url: str) -> None:
    """The demo's search: a new photo of a catalog product sent to the app at ``url``; prints
    the hits and whether the top one is the photographed product."""
    from oclear_ray import demo as steps_of

    query = steps_of.first_query(data["new_photos"])
    hits = steps_of.search_over_http(url, query["image"], k=5)
    _print_hits(f"new photo {query['query_id']} (label {query['label']})", hits)
    found = steps_of.shows_product(data, query["query_id"], hits[0])
    verdict = "[green]is[/green]" if found else "[red]is not[/red]"
    console.print(f"top hit {hits[0]['doc_id']} {verdict} the photographed product")


def _start_app(workdir: str, model_dir: str | None, host: str, port: int, **args) -> str:
    """Run the Serve app of WORKDIR on the current Ray; its base URL."""
    from ray import serve as ray_serve

    from serve.app import build_app

    ray_serve.start(http_options={"host": host, "port": port})
    application = build_app({"workdir": workdir, "model_dir": model_dir, **args})
    ray_serve.run(application, name="oclear", route_prefix="/")
    return f"http://{host}:{port}"


def _stop_app() -> None:
    from ray import serve as ray_serve

    ray_serve.shutdown()


def _serve_forever() -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _stop_app()


class _Eta(ProgressColumn):
    """The time left while a stage runs with a known total (nothing once it is done)."""

    def render(self, task):
        left = task.time_remaining
        if task.finished or left is None:
            return Text("")
        return Text(f"ETA {int(left) // 60}:{int(left) % 60:02d}", style="progress.remaining")


#: what each stage counts (train counts steps, reported by rank 0)
UNITS = {
    "govern": "documents",
    "train": "rows read",
    "embed": "documents",
    "index": "shard tasks",
    "evaluate": "queries",
}


class StageLines:
    """One rich progress line per stage (``stage: status``, a bar, time, ETA, its counts), kept
    on the terminal when done; train's line shows step / total, stage, loss, samples/s."""

    def __init__(self, totals: dict | None = None):
        self.totals, self.tasks, self.last, self.counts = dict(totals or {}), {}, {}, {}
        self.bar = Progress(
            TextColumn("[bold]{task.description}[/bold]: {task.fields[status]:<7}"),
            BarColumn(bar_width=20),
            TimeElapsedColumn(),
            _Eta(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, kind, *exc):
        if kind is not None:  # the stages still running are where it failed
            for task in self.bar.tasks:
                if not task.finished:
                    self.bar.update(task.id, status="failed")
        self.bar.stop()

    def start(self, stage: str, total: int | None = None) -> None:
        total = total or self.totals.get(stage)
        self.tasks[stage] = self.bar.add_task(stage, total=total, status="running", info="")

    def callback(self, stage: str):
        """Takes rows just done (an int) or a Ray Train report (a dict)."""
        rows = [0]

        def tick(done):
            task = self.tasks[stage]
            if isinstance(done, dict):
                self.last[stage] = done
                self.bar.update(task, completed=self._steps(done), info=self._train_info(done))
            else:
                rows[0] += done
                self.counts[stage] = f"{rows[0]} {UNITS.get(stage, 'rows')}"
                self.bar.update(task, info=self.counts[stage])

        return tick

    def _steps(self, report: dict) -> float:
        total = self.bar.tasks[self.tasks["train"]].total or 0
        return report["progress"] * total if "progress" in report else report["step"]

    def _train_info(self, r: dict) -> str:
        total = self.bar.tasks[self.tasks["train"]].total
        of = f"/{total:.0f}" if total else ""
        return f"step {r['step']}{of} {r['stage']} loss {r['loss']:.3f} {r['samples_per_s']:.0f}/s"

    def finish(self, stage: str, info: str, status: str = "done") -> None:
        if stage not in self.tasks:
            self.start(stage)
        task = self.tasks[stage]
        total = self.bar.tasks[task].total or 1
        count = self.counts.get(stage, "")
        if stage != "train" and count and count.split()[0] not in info.split():  # once
            info = f"{count}, {info}"
        self.bar.update(task, total=total, completed=total, status=status, info=info)
        self.bar.stop_task(task)

    def log(self, stage: str, status: str, info: dict) -> None:
        """``run_pipeline``'s ``log``: a stage skipped, started or done."""
        if status == "running":
            self.start(stage)
        else:
            self.finish(stage, headline(stage, info, self.last.get(stage)), status)


def headline(stage: str, out: dict, report: dict | None = None) -> str:
    """A stage's figure of note from its stamp's output (and rank 0's last training report)."""
    if stage == "govern" and "choice" in out:
        return "class map " + ("applied" if out["choice"].get("apply") else "not applied")
    if stage == "train":
        loss = f", loss {report['loss']:.3f}" if report else ""
        views = out.get("views")
        view = ""
        if views:
            levels = f" {views['shape_levels']}" if views.get("shape_levels") else ""
            view = f"; {views['doc_view']} docs, shape {views['shape_weight']:g}{levels}"
        return f"{out.get('steps', '?')} steps{loss}{view}"
    if stage == "embed" and "embedded" in out:
        return f"{out['embedded']} documents embedded"
    if stage == "index" and "count" in out:
        return f"{out['count']} documents ({out.get('action', 'built')})"
    if stage == "evaluate" and "recall@1" in out:
        return (
            f"R@1 {out['recall@1']:.3f}, R@10 {out['recall@10']:.3f} ({out['n_queries']} queries)"
        )
    return ", ".join(f"{k} {v}" for k, v in out.items() if isinstance(v, int | float | str))[:60]


#: where each stage's artifact is, under the work directory
ARTIFACTS = {
    "govern": "govern/report.html",
    "train": "train/model",
    "embed": "embed",
    "index": "index",
    "evaluate": "eval/report.html",
}


def _run_stages(cfg) -> dict:
    """``run_pipeline`` with a progress line per stage, then the summary table."""
    from oclear_ray import storage
    from oclear_ray.pipeline import run_pipeline

    with StageLines({"train": cfg.train.total_steps}) as lines:
        results = run_pipeline(cfg, log=lines.log, progress=lines.callback)
    table = Table(title="pipeline")
    for column in ("stage", "time", "result", "artifact"):
        table.add_column(column, justify="right" if column == "time" else "left")
    for r in results.values():
        took = f"{r.seconds:.1f} s" if r.status == "ran" else "current"
        figure = headline(r.stage, r.output, lines.last.get(r.stage))
        table.add_row(r.stage, took, figure, storage.join(cfg.workdir, ARTIFACTS[r.stage]))
    console.print(table)
    return results


def _print_hits(name: str, hits: list[dict]) -> None:
    table = Table(title=name)
    for column in ("#", "score", "doc_id", "label", "category", "text"):
        table.add_column(column, justify="right" if column in ("#", "score") else "left")
    for rank, hit in enumerate(hits, 1):
        row = [hit.get(c) or "" for c in ("doc_id", "label", "category", "text")]
        table.add_row(str(rank), f"{hit['score']:.4f}", *row)
    out.print(table)
