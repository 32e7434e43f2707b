"""Train on openmoji-dev for a wall-time budget, then score the exported model.

    python bench/train.py [--data ../shared/data/openmoji-dev] [--minutes 10] [--workers 2]
                          [--steps 900] [--config YAML] [--no-text]

Trains with ``oclear_ray.train.fit`` (Ray Train, FSDP2 + sharded head), embeds the whole catalog
and the held-out eval queries with the exported encoders, searches exactly, and prints R@1/R@10
and MAP@R with fused and with image-only document embeddings (the same model) next to the set's
anchors (pixel k-NN R@1 0.698, plain PyTorch CNN R@1 0.808). ``--no-text`` trains every stage on
the image towers only (the same steps and minutes): the model to set against the fused one when
the ablation is "with vs without the text modality" rather than "the same model's documents
with vs without their text".
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import tempfile
import time

import pyarrow.parquet as pq
import torch

from oclear_ray.config import train_config
from oclear_ray.evaluate import embed_in_process, exact_search, map_at_r, recall_at, relevance
from oclear_ray.export import load_doc_encoder, load_query_encoder
from oclear_ray.runtime import init_ray
from oclear_ray.train import fit

ANCHORS = {"pixel k-NN": 0.698, "plain PyTorch CNN (10 min)": 0.808}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/openmoji-dev")
    )
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--config", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--no-text", action="store_true", help="train the image towers only, in every stage"
    )
    return p.parse_args()


def score(model_dir: str, data: str) -> dict:
    """Recall of the eval queries against the fused and the image-only document embeddings."""
    torch.set_num_threads(2)
    catalog = pq.read_table(os.path.join(data, "catalog.parquet")).to_pydict()
    queries = pq.read_table(os.path.join(data, "eval_queries.parquet")).to_pydict()
    xq = embed_in_process(load_query_encoder(model_dir), queries["image"], doc=False)
    doc_encoder = load_doc_encoder(model_dir)
    per_label = collections.Counter(catalog["label"])
    R = [per_label[label] for label in queries["label"]]  # relevant documents per query
    out = {}
    for name, texts in (("fused", catalog["text"]), ("image_only", None)):
        xb = embed_in_process(doc_encoder, catalog["image"], texts, doc=True)
        _, I = exact_search(xq, xb, max(10, *R))
        rel = relevance(I, queries["label"], catalog["label"])
        out[name] = {**recall_at(rel, (1, 5, 10)), "map@r": map_at_r(rel, R)}
    return out


def main(args):
    workdir = args.workdir or tempfile.mkdtemp(prefix="oclear-bench-train-")
    cfg = train_config(
        args.config, workers=args.workers, steps=args.steps, max_minutes=args.minutes
    )
    if args.no_text:
        schedule = [dataclasses.replace(s, towers="image") for s in cfg.schedule]
        cfg = dataclasses.replace(cfg, schedule=schedule)
    init_ray()
    t0 = time.time()
    result = fit(
        cfg,
        catalog=os.path.join(args.data, "catalog.parquet"),
        queries=os.path.join(args.data, "train_queries.parquet"),
        workdir=workdir,
    )
    wall = time.time() - t0
    scores = score(result.model_dir, args.data)
    print(
        json.dumps({"wall_s": round(wall, 1), "train_metrics": result.metrics, **scores}, indent=2)
    )
    fused, image_only = scores["fused"]["recall@1"], scores["image_only"]["recall@1"]
    print(
        f"R@1 fused {fused:.3f} vs image-only documents {image_only:.3f}: "
        f"{100 * (fused - image_only):+.1f} points"
    )
    for name, anchor in ANCHORS.items():
        print(f"R@1 {fused:.3f} vs {name} {anchor:.3f}: ratio {fused / anchor:.2f}")


if __name__ == "__main__":
    main(parse_args())
