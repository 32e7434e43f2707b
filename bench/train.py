"""Train for a wall-time budget, then score the exported model beside the loops a user would
compare it with.

    python bench/train.py [--data ../shared/data/openmoji-dev] [--minutes 10] [--workers 2]
                          [--steps N] [--config YAML] [--no-text] [--baseline plain bare]

Trains with ``oclear_ray.train.fit`` (Ray Train, FSDP2 + sharded head; without ``--steps`` the
budget is the schedule), embeds the whole catalog and the held-out eval queries, searches
exactly, and prints R@1/R@10 and MAP@R with fused and with image-only document embeddings (the
same model). ``--no-text`` trains every stage on the image towers only (the same minutes): the
model to set against the fused one when the ablation is "with vs without the text modality".
``--baseline plain`` then trains the plain PyTorch loop of ``baselines.py`` for the same minutes
on the same cores, and ``--baseline bare`` the platform's own model and loss in one process
without Ray or FSDP: their R@1 beside the platform's, and the platform's samples/s over the bare
loop's (what Ray and FSDP cost).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from baselines import train_bare, train_plain

from jobs import add_options
from oclear_ray.config import train_config
from oclear_ray.evaluate import embed_in_process, exact_search, map_at_r, recall_at, relevance
from oclear_ray.export import doc_view_of, load_doc_encoder, load_query_encoder, read_manifest
from oclear_ray.pipeline import PipelineConfig
from oclear_ray.runtime import init_ray
from oclear_ray.train import fit
from oclear_ray.views import VIEW_SPLITS, distinct, validation_split

PROBE_SHARE = PipelineConfig.probe_share


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/openmoji-dev")
    )
    p.add_argument("--minutes", type=float, default=10.0, help="budget; with --steps, a cap")
    add_options(p, "train", only=("config", "workers", "steps"))  # as `oclear train` has them
    p.set_defaults(workers=2)
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--no-text", action="store_true", help="train the image towers only, in every stage"
    )
    p.add_argument(
        "--baseline", nargs="*", default=[], choices=["plain", "bare"], help="loops to set beside"
    )
    p.add_argument(
        "--views",
        default="class",
        choices=VIEW_SPLITS,
        help="hold out training queries to choose the document view and shape code on, as "
        "`oclear pipeline --views` does (default: by class); off trains on all of them",
    )
    return p.parse_args()


def scores(xq: np.ndarray, docs: dict[str, np.ndarray], catalog: dict, queries: dict) -> dict:
    """R@1/5/10 and MAP@R of the query embeddings against each named document embedding, and
    R@1 over the distinct queries (``views.distinct``: each image of a class once; on
    openmoji-dev a class's variants share one line drawing, so a few classes weigh up to 26
    times in the plain R@1)."""
    per_label = collections.Counter(catalog["label"])
    R = [per_label[label] for label in queries["label"]]  # relevant documents per query
    first = np.array(distinct(queries["image"], queries["label"]))
    out = {}
    for name, xb in docs.items():
        _, I = exact_search(xq, xb, max(10, *R))
        rel = relevance(I, queries["label"], catalog["label"])
        out[name] = {**recall_at(rel, (1, 5, 10)), "map@r": map_at_r(rel, R)}
        out[name]["distinct@1"] = float(rel[first, 0].mean())
    return out


def score(model_dir: str, data: str) -> dict:
    """The exported model on the set in ``data``: fused and image-only documents."""
    catalog = pq.read_table(os.path.join(data, "catalog.parquet")).to_pydict()
    queries = pq.read_table(os.path.join(data, "eval_queries.parquet")).to_pydict()
    return score_model(model_dir, catalog, queries)


def score_model(model_dir: str, catalog: dict, queries: dict) -> dict:
    """The exported model: fused and image-only documents."""
    torch.set_num_threads(2)
    xq = embed_in_process(load_query_encoder(model_dir), queries["image"], doc=False)
    doc = load_doc_encoder(model_dir)
    docs = {
        "fused": embed_in_process(doc, catalog["image"], catalog["text"], doc=True),
        "image_only": embed_in_process(doc, catalog["image"], None, doc=True),
    }
    return scores(xq, docs, catalog, queries)


def main(args):
    workdir = args.workdir or tempfile.mkdtemp(prefix="oclear-bench-train-")
    cfg = train_config(
        args.config, workers=args.workers, steps=args.steps, max_minutes=args.minutes
    )
    if args.no_text:
        schedule = [dataclasses.replace(s, towers="image") for s in cfg.schedule]
        cfg = dataclasses.replace(cfg, schedule=schedule)
    paths = {k: os.path.join(args.data, f"{k}.parquet") for k in ("catalog", "train_queries")}
    catalog = pq.read_table(os.path.join(args.data, "catalog.parquet"))
    eval_q = pq.read_table(os.path.join(args.data, "eval_queries.parquet")).to_pydict()
    init_ray()
    t0 = time.time()
    split = None
    if args.views != "off":  # the pipeline's split (its probe_share)
        split = validation_split(
            paths["train_queries"], paths["catalog"], workdir, share=PROBE_SHARE, by=args.views
        )
    queries = split.train_path if split else paths["train_queries"]
    result = fit(cfg, catalog=paths["catalog"], queries=queries, workdir=workdir, views=split)
    wall = time.time() - t0
    if result.views:
        print(json.dumps({"view_choice": result.views}, indent=1))
    rows = {"oclear-ray": score_model(result.model_dir, catalog.to_pydict(), eval_q)}
    rate = {"oclear-ray": result.metrics["run_samples_per_s"]}
    steps = {"oclear-ray": result.steps}
    print(json.dumps({"wall_s": round(wall, 1), "train_metrics": result.metrics}, indent=1))
    train_q = pq.read_table(paths["train_queries"])
    if "bare" in args.baseline:
        out = os.path.join(workdir, "bare-model")
        steps["bare"], rate["bare"] = train_bare(cfg, catalog, train_q, args.minutes, out)
        rows["bare"] = score_model(out, catalog.to_pydict(), eval_q)
    if "plain" in args.baseline:
        embed, steps["plain"], rate["plain"] = train_plain(catalog, train_q, args.minutes)
        xb = {"image_only": embed(catalog["image"].to_pylist())}
        rows["plain"] = scores(embed(eval_q["image"]), xb, catalog.to_pydict(), eval_q)
    report(rows, rate, steps, args.minutes, doc_view_of(read_manifest(result.model_dir)))


def report(rows: dict, rate: dict, steps: dict, minutes: float, view: str) -> None:
    """The table; the platform is compared in the document view its export embeds (chosen on
    validation queries, or fused without a choice), never the better one on these queries."""
    print(f"\n{minutes:g} minutes each, eval queries vs the whole catalog, exact search")
    print(
        f"{'loop':<12} {'docs':<11} {'R@1':>6} {'R@10':>6} {'MAP@R':>6} {'R@1 distinct':>12} "
        f"{'steps':>6} {'samples/s':>9}"
    )
    for loop, by_docs in rows.items():
        for docs, m in by_docs.items():
            print(
                f"{loop:<12} {docs:<11} {m['recall@1']:6.3f} {m['recall@10']:6.3f} "
                f"{m['map@r']:6.3f} {m['distinct@1']:12.3f} {steps[loop]:6d} {rate[loop]:9.1f}"
            )
    ours = rows["oclear-ray"]
    fused, image = ours["fused"]["recall@1"], ours["image_only"]["recall@1"]
    print(f"fused vs image-only documents: {100 * (fused - image):+.1f} points R@1")
    if "plain" in rows:
        plain = rows["plain"]["image_only"]["recall@1"]
        print(
            f"oclear-ray ({view}, its export's view) vs plain loop: "
            f"{100 * (ours[view]['recall@1'] - plain):+.1f} points R@1"
        )
    if "bare" in rate:
        print(f"samples/s oclear-ray / bare loop: {rate['oclear-ray'] / rate['bare']:.2f}")


if __name__ == "__main__":
    main(parse_args())
