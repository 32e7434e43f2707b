"""The loops bench/train.py sets beside the platform train and embed (tiny data, seconds)."""

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from oclear_ray.export import load_doc_encoder
from oclear_ray.synth import SynthConfig, generate
from tests.test_train import small_config

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from baselines import train_bare, train_plain  # noqa: E402


def test_plain_and_bare_loops_train_for_their_budget_and_embed(tmp_path):
    generate(tmp_path, SynthConfig(docs=48, classes=8, queries_per_class=2, seed=5))
    catalog = pq.read_table(tmp_path / "catalog.parquet")
    queries = pq.read_table(tmp_path / "queries.parquet")
    embed, steps, rate = train_plain(catalog, queries, minutes=0.05)
    x = embed(catalog["image"].to_pylist()[:5])
    assert steps >= 1 and rate > 0 and x.shape == (5, 128)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    steps, rate = train_bare(
        small_config(workers=1, fuse_steps=4), catalog, queries, 0.05, str(tmp_path / "m")
    )
    assert steps >= 1 and rate > 0
    doc = load_doc_encoder(str(tmp_path / "m"))
    docs = doc.encode_doc(images=catalog["image"].to_pylist()[:3], texts=["a", "b", ""])
    assert docs.shape == (3, doc.model.config.output_dim)
