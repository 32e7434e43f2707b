"""Category governance on a noisy synthetic catalog: detection figures and what they buy.

    python bench/governance.py [--docs 1500] [--classes 150] [--noise 0.3] [--steps 300]
    python bench/governance.py --workdir W --rescore   # score the models of a previous run
    python bench/governance.py --workdir W --stage govern   # then --stage a_clean, b_noisy, ...

Draws a catalog with ``oclear synth`` (30 % label noise, aliased and broad labels), runs
``govern`` on it and scores the class map against truth.json (noise, merge and split
precision/recall). Then trains three times with the same recipe and budget (``RECIPE``,
``--steps``) and evaluates R@1 of the held-out query photos against the catalog (image + text
document embeddings):

  (a) clean labels (the noise undone from truth.json; aliases and broad labels kept),
  (b) noisy labels, no governance,
  (c) noisy labels with the governance class map.

A hit is a retrieved document of the query's product (truth.json), so the three runs are
scored alike whatever labels they trained on. The held-out queries are of classes no training
query shows; ``seen_recall@k`` scores fresh photos of the classes the training queries show.
Prints one JSON with the figures and c/a. Each stage (``--stage``) saves WORK/STAGE.json, so a
run can be done one step at a time (on a shared machine, one lock per training).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from oclear_ray.classmap import load_class_map
from oclear_ray.cli import config_from
from oclear_ray.config import TrainConfig, load_config
from oclear_ray.evaluate import embed_in_process, exact_search
from oclear_ray.export import load_doc_encoder, load_query_encoder
from oclear_ray.govern import GovernConfig, govern, score_against_truth
from oclear_ray.runtime import init_ray
from oclear_ray.synth import SynthConfig, generate, more_photos
from oclear_ray.train import fit


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=1500)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--alias-rate", type=float, default=0.1)
    p.add_argument("--broad-rate", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", default=None, help="training YAML (default: the CPU default)")
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help=f"training config override (YAML value); default: {' '.join(RECIPE)}",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--rescore", action="store_true", help="score the models already trained in --workdir"
    )
    p.add_argument(
        "--stage",
        choices=("all", "govern", *RUNS),
        default="all",
        help="one stage only (needs --workdir; later stages reuse its data and class map)",
    )
    return p.parse_args()


def clean_catalog(data: str, truth: dict) -> str:
    """catalog.parquet with every corrupted label put back (truth.json), as clean.parquet."""
    table = pq.read_table(os.path.join(data, "catalog.parquet"))
    fixed = [
        truth["corrupted"].get(d, lab)
        for d, lab in zip(
            table.column("doc_id").to_pylist(), table.column("label").to_pylist(), strict=True
        )
    ]
    table = table.set_column(table.column_names.index("label"), "label", pa.array(fixed))
    path = os.path.join(data, "clean.parquet")
    pq.write_table(table, path)
    return path


# The eval classes have no query photo in training: the query tower learns them from photo-like
# views of their documents (with the default 0.0, held-out-class R@1 stays near chance).
RECIPE = ("data.doc_as_query_rate=0.5",)
SEEN = "seen_class_photos"  # held-out photos of the training queries' classes


def seen_class_photos(data: str, truth: dict) -> dict:
    """DATA/seen_class_photos.parquet (drawn once): two fresh photos of each product that has a
    training query, in no training set. Returns {query_id: product_id}."""
    path, index = os.path.join(data, f"{SEEN}.parquet"), os.path.join(data, f"{SEEN}.json")
    if not os.path.exists(index):
        trained = pq.read_table(os.path.join(data, "queries.parquet"), columns=["query_id"])
        products = sorted({truth["query_product"][q] for q in trained.column(0).to_pylist()})
        made = more_photos(path, SynthConfig(**truth["config"]), products, per_product=2)
        with open(index, "w") as f:
            json.dump(made, f)
    with open(index) as f:
        return json.load(f)


def product_recall(model_dir: str, data: str, truth: dict, ks=(1, 5, 10)) -> dict:
    """Recall@k of the eval query photos (held-out queries, of classes no training query
    shows): a hit is a document of the query's product. ``seen_recall@k``: the same for new
    photos of the classes the training queries show (``seen_class_photos``);
    ``train_queries_recall@k``: for the training query photos themselves. Also
    ``doc_recall@1``: each catalog document (of a product with two or more) as a query
    against the others, which shows how the embedding groups products."""
    torch.set_num_threads(2)
    docs = pq.read_table(os.path.join(data, "catalog.parquet")).to_pydict()
    xb = embed_in_process(load_doc_encoder(model_dir), docs["image"], docs["text"], doc=True)
    doc_product = np.array([truth["doc_product"][d] for d in docs["doc_id"]], dtype=object)
    product_of = {**truth["query_product"], **seen_class_photos(data, truth)}
    query_encoder = load_query_encoder(model_dir)
    out = {}
    sets = (("eval_queries", ""), (SEEN, "seen_"), ("queries", "train_queries_"))
    for name, prefix in sets:
        queries = pq.read_table(os.path.join(data, f"{name}.parquet")).to_pydict()
        xq = embed_in_process(query_encoder, queries["image"], doc=False)
        _, I = exact_search(xq, xb, max(ks))
        query_product = np.array([product_of[q] for q in queries["query_id"]])
        hits = doc_product[I] == query_product.astype(object)[:, None]
        out.update({f"{prefix}recall@{k}": float(hits[:, :k].any(1).mean()) for k in ks})
    _, J = exact_search(xb, xb, 2)
    _, inverse, counts = np.unique(doc_product, return_inverse=True, return_counts=True)
    several = counts[inverse] >= 2
    nearest = np.where(J[:, 0] == np.arange(len(J)), J[:, 1], J[:, 0])
    out["doc_recall@1"] = float((doc_product[nearest] == doc_product)[several].mean())
    return out


RUNS = ("a_clean", "b_noisy", "c_governed")


def train_and_score(name, cfg, catalog, data, work, truth, class_map=None) -> dict:
    started = time.time()
    result = fit(
        cfg,
        catalog=catalog,
        queries=os.path.join(data, "queries.parquet"),
        workdir=os.path.join(work, name),
        class_map=class_map,
        name=name,
    )
    out = product_recall(result.model_dir, data, truth)
    out.update(
        classes=result.num_classes,
        class_map=result.class_map_version,
        steps=cfg.total_steps,
        data=dataclasses.asdict(cfg.data),
        minutes=round((time.time() - started) / 60, 2),
    )
    print(name, json.dumps(out), flush=True)
    return out


def rescore(work: str) -> dict:
    """Score the three models a previous run left in ``work`` again (no training)."""
    data = os.path.join(work, "data")
    with open(os.path.join(data, "truth.json")) as f:
        truth = json.load(f)
    class_map = load_class_map(os.path.join(work, "c", "govern", "class_map.json"))
    runs = {
        name: product_recall(os.path.join(work, name, "train", "model"), data, truth)
        for name in RUNS
    }
    return {"governance": score_against_truth(class_map, truth), "runs": runs}


def ratios(runs: dict) -> dict:
    """b/a and c/a of every figure."""
    a, b, c = (runs[k] for k in RUNS)
    return {
        key: {
            "b/a": b[key] / a[key] if a[key] else None,
            "c/a": c[key] / a[key] if a[key] else None,
        }
        for key in a
        if key.startswith(("recall@", "seen_recall@", "doc_recall@", "train_queries_recall@"))
    }


def run_govern(args, work: str) -> dict:
    """Draw the catalog, govern it, score the class map; saved as WORK/govern.json."""
    data = os.path.join(work, "data")
    generate(data, config_from(SynthConfig, vars(args)))  # --docs, --classes, --noise, ...
    with open(os.path.join(data, "truth.json")) as f:
        truth = json.load(f)
    init_ray()
    started = time.time()
    governed = govern(
        os.path.join(data, "catalog.parquet"),
        os.path.join(work, "c"),
        config=GovernConfig(),
        queries=os.path.join(data, "queries.parquet"),
    )
    report = {
        "catalog": truth["counts"],
        "govern_minutes": round((time.time() - started) / 60, 2),
        "governance": score_against_truth(load_class_map(governed.class_map_path), truth),
    }
    _save(work, "govern", report)
    return report


def run_training(name: str, args, work: str) -> dict:
    """Train one of the three runs on WORK's data (after the govern stage); WORK/NAME.json."""
    data = os.path.join(work, "data")
    with open(os.path.join(data, "truth.json")) as f:
        truth = json.load(f)
    cfg = training_config(args)
    catalog = os.path.join(data, "catalog.parquet")
    class_map = None
    if name == "a_clean":
        catalog = clean_catalog(data, truth)
    elif name == "c_governed":
        class_map = os.path.join(work, "c", "govern", "class_map.json")
    init_ray()
    out = train_and_score(name, cfg, catalog, data, work, truth, class_map=class_map)
    _save(work, name, out)
    return out


def training_config(args) -> TrainConfig:
    """The recipe all three runs share: --config plus --set overrides, --steps, --workers."""
    overrides = {"run.workers": args.workers}
    for item in RECIPE if args.set is None else args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    return load_config(args.config, overrides).with_total_steps(args.steps)


def _save(work: str, name: str, report: dict) -> None:
    with open(os.path.join(work, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)


def summary(work: str) -> dict:
    """The saved stages of WORK as one report, with c/a when all three runs are there."""
    report = {"workdir": work}
    path = os.path.join(work, "govern.json")
    if os.path.exists(path):
        with open(path) as f:
            report.update(json.load(f))
    runs = {}
    for name in RUNS:
        path = os.path.join(work, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[name] = json.load(f)
    report["runs"] = runs
    if len(runs) == len(RUNS):
        report["ratios"] = ratios(runs)
    return report


def main(args):
    if args.rescore:
        report = rescore(args.workdir)
        report["ratios"] = ratios(report["runs"])
        print(json.dumps(report, indent=1))
        return
    if args.stage != "all" and not args.workdir:
        raise SystemExit("--stage needs --workdir")
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="oclear-bench-govern-"))
    os.makedirs(work, exist_ok=True)
    if args.stage in ("all", "govern"):
        print(json.dumps(run_govern(args, work), indent=1), flush=True)
    for name in RUNS:
        if args.stage in ("all", name):
            run_training(name, args, work)
    print(json.dumps(summary(work), indent=1))


if __name__ == "__main__":
    main(parse_args())
