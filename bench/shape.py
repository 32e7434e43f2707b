"""Score an exported model's learned part with each shape code beside it, on the pipeline's
validation split of the training queries and on the evaluation queries.

    python bench/shape.py MODEL_DIR [--data ../shared/data/openmoji-dev] [--sizes 16 24 32]
                          [--weights 1 2 4]

The shape code (``model.ShapeCode``) has no parameters, so any levels, size and weight can be
set beside a trained model's learned part without retraining. Validation queries are the 20 %
of the training queries' classes the pipeline holds out (``views.held_out``, its
``probe_share``); choose on them, and read the evaluation figures only after. Fused and
image-only documents, exact search, whole catalog, R@1 by label.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq
import torch

from oclear_ray.config import SHAPE_LEVELS
from oclear_ray.evaluate import embed_in_process, exact_search
from oclear_ray.export import load_doc_encoder, load_query_encoder
from oclear_ray.model import ShapeCode
from oclear_ray.pipeline import PipelineConfig
from oclear_ray.views import held_out, joined, shape_codes


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument(
        "--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/openmoji-dev")
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32])
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    return p.parse_args()


def main(args):
    torch.set_num_threads(2)
    catalog, train_q, eval_q = (
        pq.read_table(os.path.join(args.data, f"{name}.parquet")).to_pydict()
        for name in ("catalog", "train_queries", "eval_queries")
    )
    held = held_out(train_q["query_id"], train_q["label"], PipelineConfig.probe_share, "class")
    sets = {
        "val": {k: [v for v, h in zip(train_q[k], held, strict=True) if h] for k in train_q},
        "eval": eval_q,
    }
    query, doc = load_query_encoder(args.model_dir), load_doc_encoder(args.model_dir)
    config = doc.model.config
    query.model.shape = doc.model.shape = None  # the learned part alone
    docs = {
        "fused": embed_in_process(doc, catalog["image"], catalog["text"], doc=True),
        "image_only": embed_in_process(doc, catalog["image"], None, doc=True),
    }
    learned = {name: embed_in_process(query, s["image"], doc=False) for name, s in sets.items()}
    labels = np.array(catalog["label"])

    def r1(xq, xb, name) -> float:
        _, I = exact_search(xq, xb, 1)
        return float((labels[I[:, 0]] == np.array(sets[name]["label"])).mean())

    print(f"R@1 validation ({len(sets['val']['label'])} queries) / eval ({len(eval_q['label'])})")
    for view, xb in docs.items():
        figures = [r1(joined(learned[n], None, 0), joined(xb, None, 0), n) for n in sets]
        print(f"{view:<10} learned part alone       {figures[0]:.3f} / {figures[1]:.3f}")
    for levels in SHAPE_LEVELS:
        for size in args.sizes:
            shape = dataclasses.replace(config.shape, size=size, levels=levels)
            code = ShapeCode(shape, config.preprocess)
            cd = shape_codes(code, doc, catalog["image"])
            cq = {n: shape_codes(code, query, s["image"]) for n, s in sets.items()}
            alone = [r1(joined(cq[n], None, 0), joined(cd, None, 0), n) for n in sets]
            print(f"{levels} {size:>2}    shape code alone         {alone[0]:.3f} / {alone[1]:.3f}")
            for view, xb in docs.items():
                for w in args.weights:
                    got = [r1(joined(learned[n], cq[n], w), joined(xb, cd, w), n) for n in sets]
                    print(f"  {view:<10} + code at weight {w:g}    {got[0]:.3f} / {got[1]:.3f}")


if __name__ == "__main__":
    main(parse_args())
