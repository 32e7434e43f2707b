"""Choose a training recipe on a class-split validation of the training queries, never on the
evaluation queries.

    python bench/recipe.py [--data ../shared/data/logos-dev] [--steps 300 | --minutes M]
                           [--val-share 0.3] [--split class|photo] [--seeds 0]
                           --try NAME=KEY=VALUE,KEY=VALUE ...

A share of the training queries' classes (by a hash of the label) is held out: their queries are
the validation queries, and those classes reach training only through their documents, as the
evaluation classes do. Each recipe (``--set`` pairs over the default config; ``default`` is the
default itself) trains the platform's model and loss in this process (``baselines.train_bare``:
no Ray, the same cores) for the same steps or minutes, then its validation queries search the
whole catalog exactly: R@1, R@10 and MAP@R with fused, image-only and text-only documents, and
the gate's quartiles over the documents. ``--shape-weights`` then scores the same model with the
shape code (``model.shape``) beside its learned embedding at each weight (the code needs no
training, so one model serves the whole scan).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from baselines import train_bare
from train import scores

from oclear_ray.config import ShapeConfig, train_config
from oclear_ray.evaluate import embed_in_process
from oclear_ray.export import load_doc_encoder, load_query_encoder
from oclear_ray.model import ShapeCode


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/logos-dev")
    )
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--minutes", type=float, default=None, help="a time budget instead of steps")
    p.add_argument("--workers", type=int, default=2, help="cores, as the platform's workers")
    p.add_argument("--val-share", type=float, default=0.3)
    p.add_argument(
        "--split",
        choices=("class", "photo"),
        default="class",
        help="hold out classes (unseen products) or a share of each class's photos (new photos "
        "of seen products, what the demo measures)",
    )
    p.add_argument("--keep", default=None, help="keep each exported model under this folder")
    p.add_argument(
        "--shape-size", type=int, default=16, help="for a model without its own shape code"
    )
    p.add_argument(
        "--shape-weights", type=float, nargs="*", default=[], help="shape code weights to scan"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--try",
        dest="recipes",
        nargs="+",
        default=["default"],
        help="NAME or NAME=KEY=VALUE,KEY=VALUE (--set pairs over the config)",
    )
    return p.parse_args()


def _hashed(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8


def validation_split(
    queries: pa.Table, share: float, by: str = "class"
) -> tuple[pa.Table, pa.Table]:
    """(training, validation) queries, split on a hash: of the label (``by="class"``: held-out
    classes) or of the query id (``"photo"``: held-out photos; a class keeps at least one
    training photo)."""
    labels = [str(v) for v in queries["label"].to_pylist()]
    if by == "class":
        held = [_hashed(label) < share for label in labels]
    else:
        held = [_hashed(str(q)) < share for q in queries["query_id"].to_pylist()]
        kept = {label for label, h in zip(labels, held, strict=True) if not h}
        for i, label in enumerate(labels):  # a class whose photos were all drawn keeps one
            if label not in kept:
                held[i] = False
                kept.add(label)
    mask = pa.array(held)
    return queries.filter(pc.invert(mask)), queries.filter(mask)


def recipe(spec: str) -> tuple[str, list[str]]:
    name, _, sets = spec.partition("=")
    return name, [s for s in sets.split(",") if s]


def _batches(n: int, size: int = 256):
    return (slice(i, i + size) for i in range(0, n, size))


def evaluate(model_dir: str, catalog: dict, queries: dict, shape_size: int, weights) -> dict:
    """Validation figures of the exported model (its own shape weight): fused, image-only and
    text-only documents and the gate's quartiles; then fused and image-only R@1 / R@10 with the
    shape code at each of ``weights``. Every input is embedded once: the learned part and the
    shape code apart, joined per weight."""
    torch.set_num_threads(2)
    query, doc = load_query_encoder(model_dir), load_doc_encoder(model_dir)
    own = query.model.config.shape
    size, weight = (own.size, own.weight) if own.dim else (shape_size, 0.0)
    query.model.shape = doc.model.shape = None  # the learned part alone
    code = ShapeCode(ShapeConfig(size=size, levels=own.levels), doc.preprocess)
    images, texts = catalog["image"], catalog["text"]
    fused, gates, sd = [], [], []
    with torch.no_grad():
        for b in _batches(len(images)):
            emb, gate = doc.encode_doc(images[b], texts[b], return_gate=True)
            fused.append(emb.numpy()), gates.append(gate.numpy())
            sd.append(code(doc.images(images[b])).numpy())
        sq = np.concatenate(
            [
                code(query.images(queries["image"][b])).numpy()
                for b in _batches(len(queries["image"]))
            ]
        )
    learned = {
        "fused": np.concatenate(fused),
        "image_only": embed_in_process(doc, images, None, doc=True),
        "text_only": _text_only(query, texts),
    }
    xq, sd = embed_in_process(query, queries["image"], doc=False), np.concatenate(sd)

    def at(w: float, names) -> dict:
        """Scores with the shape code at weight ``w`` (a text has no shape: zeros there)."""
        docs = {
            k: np.hstack([learned[k], (0.0 if k == "text_only" else w) * sd]).astype(np.float32)
            for k in names
        }
        return scores(np.hstack([xq, w * sq]).astype(np.float32), docs, catalog, queries)

    out = at(weight, learned)
    out["gate"] = np.quantile(np.concatenate(gates), [0.25, 0.5, 0.75]).round(2).tolist()
    out["shape"] = {
        w: {k: (v["recall@1"], v["recall@10"]) for k, v in at(w, ["fused", "image_only"]).items()}
        for w in weights
    }
    return out


def _text_only(query, texts) -> np.ndarray:
    """Documents as their text alone through the query tower; a document without text is a
    zero vector (it finds nothing)."""
    has = [i for i, t in enumerate(texts) if t and t.strip()]
    found = embed_in_process(query, None, [texts[i] for i in has], doc=False)
    out = np.zeros((len(texts), found.shape[1]), np.float32)
    out[has] = found
    return out


def main(args):
    catalog = pq.read_table(os.path.join(args.data, "catalog.parquet"))
    train_q, val_q = validation_split(
        pq.read_table(os.path.join(args.data, "train_queries.parquet")), args.val_share, args.split
    )
    print(
        f"{args.data}: {train_q.num_rows} training queries, {val_q.num_rows} validation queries "
        f"of {len(set(val_q['label'].to_pylist()))} classes (split by {args.split})"
    )
    cat, val = catalog.to_pydict(), val_q.to_pydict()
    rows = []
    for spec in args.recipes:
        name, sets = recipe(spec)
        for seed in args.seeds:
            cfg = train_config(args.config, workers=args.workers, sets=[*sets, f"run.seed={seed}"])
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(args.keep, f"{name}-{seed}") if args.keep else tmp
                t0 = time.time()
                steps, rate = train_bare(cfg, catalog, train_q, args.minutes, out, args.steps)
                wall = time.time() - t0
                m = evaluate(out, cat, val, args.shape_size, args.shape_weights)
            rows.append((name, seed, steps, rate, wall, m))
            print(line(*rows[-1]), flush=True)
    print(f"\n{'recipe':<16} {'seed':>4} {'steps':>5} {'smp/s':>6} {'wall':>5}  " + HEADER)
    for row in rows:
        print(line(*row))
    if args.shape_weights:
        print(
            f"\nshape code {args.shape_size}x{args.shape_size} beside the learned part: R@1 / R@10"
        )
        print(f"{'recipe':<16} {'seed':>4} {'weight':>6}  {'fused':>11}  {'image-only':>11}")
        for name, seed, *_, m in rows:
            for w, r in m["shape"].items():
                f, i = r["fused"], r["image_only"]
                print(
                    f"{name:<16} {seed:>4} {w:6.2f}  {f[0]:.3f}/{f[1]:.3f}  {i[0]:.3f}/{i[1]:.3f}"
                )


HEADER = "R@1 fused/image/text   R@10 fused/image   MAP@R fused/image   gate q1/q2/q3"


def line(name, seed, steps, rate, wall, m) -> str:
    f, i, t = m["fused"], m["image_only"], m["text_only"]
    return (
        f"{name:<16} {seed:>4} {steps:>5} {rate:6.0f} {wall:5.0f}  "
        f"{f['recall@1']:.3f}/{i['recall@1']:.3f}/{t['recall@1']:.3f}    "
        f"{f['recall@10']:.3f}/{i['recall@10']:.3f}        "
        f"{f['map@r']:.3f}/{i['map@r']:.3f}         {'/'.join(map(str, m['gate']))}"
    )


if __name__ == "__main__":
    main(parse_args())
