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
def govern(
    catalog: str = typer.Option(..., help="Catalog (parquet, manifest or webdataset)."),
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
    from oclear_ray.contract import SchemaError
    from oclear_ray.govern import GovernConfig, load_class_map, score_against_truth
    from oclear_ray.govern import govern as run_govern
    from oclear_ray.review import load_review
    from oclear_ray.runtime import init_ray

    try:
        config = GovernConfig(policy=policy, cap=cap)
        verdict = load_review(review) if review else None
        init_ray(address)
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
    except (SchemaError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(storage.read_bytes(storage.join(workdir, "govern", "report.md")).decode())
    console.print(f"class map: {result.class_map_path} (version {result.version})")
    console.print(f"review: {storage.join(workdir, 'govern', 'report.html')}")
    if truth is not None:
        class_map = load_class_map(result.class_map_path)
        scores = score_against_truth(class_map, json.loads(truth.read_text()))
        console.print_json(json.dumps(scores))


@app.command()
def train(
    catalog: str = typer.Option(..., help="Catalog (parquet, manifest or webdataset)."),
    workdir: str = typer.Option(..., help="Work directory (model goes to WORKDIR/train/model)."),
    queries: str | None = typer.Option(None, help="Training query photos."),
    class_map: str | None = typer.Option(
        None, help="Class map from oclear govern; default WORKDIR/govern/class_map.json if any."
    ),
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
    result = fit(cfg, catalog=catalog, queries=queries, workdir=workdir, class_map=class_map)
    console.print(f"model: {result.model_dir} ({result.num_classes} classes)")
    if result.metrics:
        console.print_json(json.dumps(result.metrics))


@app.command()
def embed(
    catalog: str = typer.Option(..., help="Catalog (parquet, manifest or webdataset)."),
    workdir: str = typer.Option(..., help="Work directory (embeddings go to WORKDIR/embed)."),
    model_dir: str | None = typer.Option(None, help="Exported model; default WORKDIR/train/model."),
    format: str | None = typer.Option(
        None, help="parquet, manifest or webdataset; default: guess."
    ),
    actors: int = typer.Option(1, help="Embedding actors (each loads the encoder once)."),
    cpus_per_actor: float = typer.Option(1.0, help="Ray CPUs per actor (may be fractional)."),
    threads_per_actor: int | None = typer.Option(
        None, help="Torch threads per actor; default: its whole CPUs."
    ),
    batch_size: int = typer.Option(64, help="Documents per encoder call."),
    rows_per_part: int = typer.Option(10_000, help="Rows per output part (the resume unit)."),
    use_gpu: bool | None = typer.Option(
        None, "--use-gpu/--no-gpu", help="One GPU per actor; default: when the cluster has GPUs."
    ),
    image_only: bool = typer.Option(
        False, "--image-only", help="Embed documents from their image alone (fusion ablation)."
    ),
    address: RayAddress = None,
):
    """Embed a catalog with the document encoder into WORKDIR/embed; a rerun resumes."""
    from oclear_ray.contract import SchemaError
    from oclear_ray.embed import EmbedConfig, embed_catalog
    from oclear_ray.runtime import init_ray

    try:
        config = EmbedConfig(
            batch_size=batch_size,
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            threads_per_actor=threads_per_actor,
            use_gpu=use_gpu,
            rows_per_part=rows_per_part,
            image_only=image_only,
        )
        init_ray(address)
        with progress_bar("embed") as advance:
            result = embed_catalog(
                catalog,
                workdir,
                model_dir=model_dir,
                config=config,
                format=format,
                progress=advance,
            )
    except (SchemaError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print_json(json.dumps(vars(result)))


@app.command()
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
):
    """Build the FAISS shards from WORKDIR/embed, or bring them up to date."""
    from oclear_ray.index import IndexConfig, sync_index
    from oclear_ray.runtime import init_ray

    ids = list(delete or [])
    if delete_file is not None:
        ids += [line.strip() for line in delete_file.read_text().splitlines() if line.strip()]
    try:
        config = IndexConfig(
            shards=shards, factory=factory, memory_gb=memory_gb, rebuild_fraction=rebuild_fraction
        )
        init_ray(address)
        with console.status("index"):
            result = sync_index(workdir, config, rebuild=rebuild, delete=ids)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print_json(json.dumps(result.to_dict()))


@app.command(name="eval")
def eval_(
    workdir: str = typer.Option(..., help="Work directory (report goes to WORKDIR/eval)."),
    queries: str = typer.Option(..., help="Labelled queries (parquet, manifest or webdataset)."),
    model_dir: str | None = typer.Option(None, help="Exported model; default WORKDIR/train/model."),
    catalog: str | None = typer.Option(None, help="Catalog for thumbnails; default: as embedded."),
    format: str | None = typer.Option(None, help="Format of the queries; default: guess."),
    image_only_docs: bool = typer.Option(
        False, "--image-only-docs", help="Also measure image-only vs fused documents (exact)."
    ),
    actors: int = typer.Option(1, help="Query-encoder actors."),
    cpus_per_actor: float = typer.Option(0.5, help="Ray CPUs per actor (may be fractional)."),
    threads_per_actor: int = typer.Option(2, help="Torch threads per actor."),
    grid_queries: int = typer.Option(24, help="Queries shown with their top documents."),
    address: RayAddress = None,
):
    """Embed labelled queries, search the index; write WORKDIR/eval/report.json and .html."""
    from oclear_ray.embed import EmbedConfig
    from oclear_ray.evaluate import EvalConfig, evaluate
    from oclear_ray.runtime import init_ray
    from oclear_ray.search import IndexRefused

    try:
        pool = EmbedConfig(
            actors=actors, cpus_per_actor=cpus_per_actor, threads_per_actor=threads_per_actor
        )
        init_ray(address)
        with console.status("eval"):
            report = evaluate(
                workdir,
                queries,
                model_dir=model_dir,
                config=EvalConfig(pool=pool, grid_queries=grid_queries),
                format=format,
                catalog=catalog,
                image_only_docs=image_only_docs,
            )
    except (IndexRefused, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    table = Table(title=f"{report['n_queries']} queries, {report['n_documents']} documents")
    for column in ("search", "recall@1", "recall@5", "recall@10", "map@r", "ndcg@10"):
        table.add_column(column, justify="left" if column == "search" else "right")
    rows = {"ANN": report, "exact": report["exact"], **report.get("fusion_ablation", {})}
    for name, row in rows.items():
        if isinstance(row, dict):
            cells = (row[c] for c in ("recall@1", "recall@5", "recall@10", "map@r", "ndcg@10"))
            table.add_row(name, *(f"{v:.4f}" for v in cells))
    Console().print(table)
    console.print(f"ANN vs exact recall@10: {report['ann_vs_exact']['recall@10']:.4f}")
    console.print(f"report: {os.path.join(workdir, 'eval', 'report.html')}")


@app.command()
def search(
    images: Annotated[list[Path] | None, typer.Argument(help="Query photos.")] = None,
    workdir: str = typer.Option(..., help="Work directory (WORKDIR/index, WORKDIR/train/model)."),
    text: str | None = typer.Option(None, help="Typed query: with each photo, or alone."),
    k: int = typer.Option(10, help="Documents per query."),
    model_dir: str | None = typer.Option(None, help="Exported model; default WORKDIR/train/model."),
):
    """Embed query photos and/or a text with the query encoder; print the top documents."""
    from oclear_ray.export import load_query_encoder
    from oclear_ray.search import IndexRefused, SearchIndex

    if not images and not text:
        console.print("[red]error:[/red] give query photos, --text, or both")
        raise typer.Exit(2)
    try:
        encoder = load_query_encoder(model_dir or os.path.join(workdir, "train", "model"))
        found = SearchIndex.load(
            os.path.join(workdir, "index"), expected_model_version=encoder.model_version
        )
    except (IndexRefused, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    photos = [p.read_bytes() for p in images or []]
    texts = [text] * max(1, len(photos)) if text else None
    xq = encoder.encode_query(images=photos or None, texts=texts).float().numpy()
    names = [str(p) for p in images or []] or [f"text {text!r}"]
    for name, hits in zip(names, found.search_documents(xq, k), strict=True):
        _print_hits(name, hits)


@app.command()
def serve(
    workdir: str = typer.Option(..., help="Work directory (WORKDIR/index, WORKDIR/train/model)."),
    model_dir: str | None = typer.Option(None, help="Exported model; default WORKDIR/train/model."),
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
    from oclear_ray.search import IndexRefused
    from oclear_ray.serve import Paths, VersionMismatch, check_versions

    try:
        check_versions(Paths.of(workdir, model_dir))
    except (VersionMismatch, IndexRefused, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    from oclear_ray.runtime import init_ray

    init_ray(address)
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


@app.command()
def pipeline(
    catalog: str = typer.Option(..., help="Catalog (parquet, manifest or webdataset)."),
    workdir: str = typer.Option(..., help="Work directory for every stage's artifacts."),
    queries: str | None = typer.Option(None, help="Training query photos."),
    eval_queries: str | None = typer.Option(None, help="Labelled queries to evaluate on."),
    config: str | None = typer.Option(None, help="YAML training config."),
    workers: int | None = typer.Option(None, help="Ray Train workers."),
    steps: int | None = typer.Option(None, help="Scale the training schedule to this many steps."),
    max_minutes: float | None = typer.Option(None, help="Training wall-time budget."),
    use_gpu: bool | None = typer.Option(None, "--use-gpu", help="One GPU per worker."),
    govern: str = typer.Option(
        "auto",
        help="auto (apply the class map when a probe training says it helps), apply, report "
        "(write it, train on the raw labels) or off.",
    ),
    fusion_ablation: bool = typer.Option(
        False, "--fusion-ablation", help="Also evaluate image-only document embeddings."
    ),
    address: RayAddress = None,
):
    """govern -> train -> embed -> index -> evaluate, skipping every stage that is current."""
    from oclear_ray.config import train_config
    from oclear_ray.contract import SchemaError
    from oclear_ray.pipeline import GOVERN_MODES, PipelineConfig, run_pipeline
    from oclear_ray.runtime import init_ray

    if govern not in GOVERN_MODES:
        console.print(f"[red]error:[/red] --govern must be one of {GOVERN_MODES}, got {govern!r}")
        raise typer.Exit(2)
    cfg = PipelineConfig(
        catalog=catalog,
        workdir=workdir,
        queries=queries,
        eval_queries=eval_queries,
        train=train_config(
            config, workers=workers, steps=steps, max_minutes=max_minutes, use_gpu=use_gpu
        ),
        fusion_ablation=fusion_ablation,
        govern_mode=govern,
    )
    init_ray(address)
    try:
        results = run_pipeline(cfg, log=_log_stage)
    except (SchemaError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    _print_stages(results)


@app.command()
def demo(
    workdir: str = typer.Option("runs/demo", help="Work directory (data in WORKDIR/data)."),
    docs: int = typer.Option(1500, help="Synthetic documents."),
    classes: int = typer.Option(200, help="Synthetic classes."),
    steps: int = typer.Option(300, help="Training steps."),
    config: str | None = typer.Option(None, help="YAML training config."),
    workers: int | None = typer.Option(None, help="Ray Train workers."),
    host: str = typer.Option("127.0.0.1", help="HTTP host of the search page."),
    port: int = typer.Option(8000, help="HTTP port of the search page."),
    once: bool = typer.Option(False, "--once", help="Stop after the first search answers."),
):
    """Synthesize a small catalog, run the whole pipeline on it, serve the search page and
    search it once with a held-out query photo."""
    from oclear_ray.config import train_config
    from oclear_ray.demo import ensure_data, first_query, search_over_http, wait_ready
    from oclear_ray.pipeline import PipelineConfig, run_pipeline
    from oclear_ray.runtime import init_ray

    data = ensure_data(workdir, docs=docs, classes=classes)
    cfg = PipelineConfig(
        catalog=data["catalog"],
        workdir=workdir,
        queries=data["queries"],
        eval_queries=data["eval_queries"],
        train=train_config(config, workers=workers, steps=steps),
        # its catalog has planted label noise that governance is measured to fix
        # (bench/governance.py); a probe would double the demo's training time
        govern_mode="apply",
    )
    init_ray()
    _print_stages(run_pipeline(cfg, log=_log_stage))
    url = _start_app(workdir, None, host, port)
    wait_ready(url)
    query = first_query(data["eval_queries"])
    hits = search_over_http(url, query["image"], k=5)
    _print_hits(f"query {query['query_id']} (label {query['label']})", hits)
    console.print(f"search page: {url}/  (API: {url}/v1/search, {url}/v1/info)")
    if once:
        _stop_app()
        return
    console.print("serving until Ctrl-C")
    _serve_forever()


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


def _log_stage(stage: str, status: str, info: dict) -> None:
    if status == "running":
        console.print(f"[bold]{stage}[/bold]: running")
    else:
        console.print(f"[bold]{stage}[/bold]: {status} {json.dumps(info)}")


def _print_stages(results: dict) -> None:
    table = Table(title="pipeline")
    for column in ("stage", "status", "seconds", "output"):
        table.add_column(column)
    for r in results.values():
        table.add_row(r.stage, r.status, f"{r.seconds:.1f}", json.dumps(r.output))
    console.print(table)


def _print_hits(name: str, hits: list[dict]) -> None:
    table = Table(title=name)
    for column in ("#", "score", "doc_id", "label", "category", "text"):
        table.add_column(column, justify="right" if column in ("#", "score") else "left")
    for rank, hit in enumerate(hits, 1):
        row = [hit.get(c) or "" for c in ("doc_id", "label", "category", "text")]
        table.add_row(str(rank), f"{hit['score']:.4f}", *row)
    Console().print(table)
