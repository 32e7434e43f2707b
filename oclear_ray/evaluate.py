"""The evaluate stage: retrieval metrics by label match.

``label_recall`` scores query embeddings against document embeddings with exact inner-product
search (FAISS ``IndexFlatIP``); ``embed_in_process`` embeds small sets with an exported encoder
without Ray, for quick checks and benchmarks.
"""

from __future__ import annotations

import numpy as np


def exact_search(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of ``xq`` against ``xb``: ``(D, I)``."""
    import faiss

    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(np.ascontiguousarray(xb, dtype=np.float32))
    return index.search(np.ascontiguousarray(xq, dtype=np.float32), min(k, xb.shape[0]))


def label_recall(I: np.ndarray, query_labels, doc_labels, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k: the share of queries with a document of their label among the top ``k``."""
    doc_labels = np.asarray(doc_labels, dtype=object)
    hits = doc_labels[I] == np.asarray(query_labels, dtype=object)[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(1).mean()) for k in ks}


def embed_in_process(encoder, images=None, texts=None, *, doc: bool, batch_size: int = 256):
    """Embeddings [N, D] float32 from an ``ExportedEncoder`` in batches (no Ray)."""
    n = len(images if images is not None else texts)
    out = []
    for i in range(0, n, batch_size):
        im = None if images is None else images[i : i + batch_size]
        tx = None if texts is None else texts[i : i + batch_size]
        emb = encoder.encode_doc(im, tx) if doc else encoder.encode_query(im, tx)
        out.append(emb.float().numpy())
    return np.concatenate(out)
