"""Approximate vs exact search, and S shards + merge vs one index, on clustered vectors.

    python bench/index.py [--n 1000000] [--d 128] [--centres 10000] [--queries 2000] [--shards 4]

Data: unit vectors in Gaussian blobs around ``--centres`` random centres (queries are new points
around the same centres). The index type is what ``oclear index`` would choose for ``--n``
vectors (``choose_factory``), trained once with the library (``make_index``, ``train``). The
sharded variant is built as ``oclear index`` builds it: ``--shards`` shards sharing the trained
quantiser, each owning whole IVF lists (``list_owners``), searched with the library's
``search_all`` (queries assigned to lists once, ``search_preassigned`` per shard,
``merge_knn_results``); for reference, also shards that split every list (rows by range). For
each ``nprobe``: recall@k against exact search (``IndexFlatIP``), QPS as a multiple of exact QPS,
and the time of shards + merge over one index. Also: the ``nprobe`` the build-time tuner
(documents as queries) picks.
Times are the best of ``--repeats`` interleaved batch searches with ``--threads`` FAISS threads
(the same for exact search), on the wall clock or (``--clock cpu``) the process CPU time, which
with ``--threads 1`` measures the work itself when other jobs share the cores; the load average
is printed.
"""

# ruff: noqa: E741 -- FAISS naming: D, I are distances and ids

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from oclear_ray.index import (
    NPROBE_GRID,
    add_vectors,
    choose_factory,
    list_owners,
    make_index,
    shard_ranges,
    train,
    train_size,
)
from oclear_ray.search import (
    ivf_of,
    knn_overlap,
    normalize,
    search_all,
    search_parameters,
    shared_quantizer,
    tune,
)

GOALS = {"recall@10": 0.95, "QPS vs exact": 20.0, "shards+merge overhead": 0.10}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--centres", type=int, default=10_000)
    p.add_argument("--spread", type=float, default=0.5, help="noise norm around a centre")
    p.add_argument("--queries", type=int, default=2000, help="for recall and exact QPS")
    p.add_argument("--timing-queries", type=int, default=20_000, help="for approximate QPS")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS (OpenMP) threads")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, the work itself even when other jobs share the cores",
    )
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--memory-gb", type=float, default=8.0)
    p.add_argument("--factory", default=None, help="an IVF factory; default: automatic")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-nprobe", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def blobs(n: int, centres: np.ndarray, spread: float, rng) -> np.ndarray:
    """n unit vectors, each a random centre plus Gaussian noise of norm ~``spread``."""
    d = centres.shape[1]
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= spread / np.sqrt(d)
    x += centres[rng.integers(0, len(centres), n)]
    return normalize(x)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def best_times(fns, repeats: int, clock: str) -> list[float]:
    """Best time of each function over ``repeats`` rounds, interleaved so that a burst of
    load from other jobs hits all of them alike."""
    best, now = [float("inf")] * len(fns), CLOCK[clock]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = now()
            fn()
            best[i] = min(best[i], now() - start)
    return best


def exact_search(xb: np.ndarray, xq: np.ndarray, k: int, clock: str) -> tuple[float, np.ndarray]:
    """Brute force (``IndexFlatIP``, BLAS): its time and the true top-``k`` ids."""
    exact = faiss.IndexFlatIP(xb.shape[1])
    exact.add(xb)
    start = CLOCK[clock]()
    _, gt = exact.search(xq, k)
    return CLOCK[clock]() - start, gt


def build(factory: str, xb: np.ndarray, shards: int, seed: int):
    """One index, and ``shards`` shards of the same trained index as ``oclear index`` builds
    them (each owns whole IVF lists), plus shards that split every list (for reference)."""
    index, factory = make_index(factory, xb.shape[1])
    rng = np.random.default_rng(seed)
    nt = train_size(index, len(xb))
    start = time.perf_counter()
    trained = train(index, xb[rng.choice(len(xb), nt, replace=False)] if nt else xb[:0])
    train_s = time.perf_counter() - start
    one = faiss.deserialize_index(trained)
    ids = np.arange(len(xb), dtype=np.int64)
    lists = one.quantizer.assign(xb, 1).ravel()  # once, for every variant
    add_vectors(one, xb, ids, lists)
    owner = list_owners(np.bincount(lists, minlength=one.nlist), shards)
    by_list = [np.flatnonzero(owner[lists] == i) for i in range(shards)]
    by_range = [np.arange(a, b) for a, b in shard_ranges(len(xb), shards)]
    variants = []
    for groups in (by_list, by_range):
        variants.append([faiss.deserialize_index(trained) for _ in groups])
        for shard, rows in zip(variants[-1], groups, strict=True):
            add_vectors(shard, xb[rows], rows, lists[rows])
    return factory, one, variants, train_s, time.perf_counter() - start - train_s


def searcher(shards, nprobe: int, k: int):
    """``search(xq) -> (D, I)`` over ``shards`` (one index: a list of one) at ``nprobe``."""
    params = [search_parameters(s, {"nprobe": nprobe}) for s in shards]
    quantizer = shared_quantizer(shards)
    return lambda xq: search_all(shards, xq, k, params=params, quantizer=quantizer)


def sweep(one, variants, xq, gt, exact_qps: float, args) -> list[tuple]:
    """Per nprobe: recall and QPS / exact of one index and of the list-owning shards, their
    time over one index, and that of list-splitting shards. Recall on the first ``len(gt)``
    queries, times on all of ``xq``."""
    rows = []
    for nprobe in [p for p in NPROBE_GRID if p <= min(args.max_nprobe, one.nlist)]:
        fns = [searcher(shards, nprobe, args.k) for shards in ([one], *variants)]
        t1, ts, tv = best_times([lambda f=f: f(xq) for f in fns], args.repeats, args.clock)
        r1, rs = (knn_overlap(f(xq[: len(gt)])[1], gt, args.k) for f in fns[:2])
        q1, qs = len(xq) / t1 / exact_qps, len(xq) / ts / exact_qps
        rows.append((nprobe, r1, q1, rs, qs, ts / t1 - 1, tv / t1 - 1))
        if r1 >= 0.999:
            break
    return rows


def tuned_nprobe(shards, xb, k: int, seed: int) -> tuple[int, float]:  # list-owning shards
    """What the build-time tuner picks: 200 documents as queries, themselves left out."""
    own = np.random.default_rng(seed + 1).choice(len(xb), 200, replace=False)
    _, gt = faiss.knn(xb[own], xb, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    grid = [p for p in NPROBE_GRID if p <= faiss.extract_index_ivf(shards[0]).nlist]
    return tune(
        shards,
        xb[own],
        gt,
        name="nprobe",
        grid=grid,
        quantizer=shared_quantizer(shards),
        own=own,
        k=k,
    )


def report(args, factory, rows, exact_qps, tuned, times) -> None:
    how = "given" if args.factory else f"automatic, {args.memory_gb:g} GiB"
    print(
        f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"faiss threads {faiss.omp_get_max_threads()}"
    )
    print(
        f"n={args.n} d={args.d} centres={args.centres} queries={args.queries} k={args.k} "
        f"factory={factory} ({how}) shards={args.shards}"
    )
    print("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print(
        f"exact search: {exact_qps:.0f} QPS ({args.queries} queries); approximate QPS over "
        f"{args.timing_queries} queries, best of {args.repeats}\n"
    )
    s = args.shards
    head = (
        "nprobe",
        "recall@10",
        "QPS/exact",
        f"{s}sh recall",
        f"{s}sh QPS/exact",
        f"{s}sh/one - 1",
        "split lists",
    )
    print("  ".join(f"{h:>14}" for h in head))
    for nprobe, r1, q1, rs, qs, over, split in rows:
        print(
            f"{nprobe:>14}  {r1:>14.4f}  {q1:>14.1f}  {rs:>14.4f}  {qs:>14.1f}  {over:>+14.1%}"
            f"  {split:>+14.1%}"
        )
    ok = [r for r in rows if r[1] >= GOALS["recall@10"]]
    print(f"\ntuner (200 documents as queries): nprobe {tuned[0]} (their recall {tuned[1]:.3f})")
    if not ok:
        print(f"goal: no nprobe up to {args.max_nprobe} reaches recall@10 {GOALS['recall@10']}")
        return
    nprobe, r1, q1, rs, qs, over, _ = ok[0]
    print(
        f"goal at nprobe {nprobe}: recall@10 {r1:.3f} (>= {GOALS['recall@10']}), "
        f"{q1:.1f}x exact QPS (goal >= {GOALS['QPS vs exact']:g}x), {args.shards} shards + merge "
        f"{qs:.1f}x, overhead {over:+.1%} (goal <= {GOALS['shards+merge overhead']:.0%})"
    )


def main(args) -> None:
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    times, start = {}, time.perf_counter()
    centres = normalize(rng.standard_normal((args.centres, args.d), dtype=np.float32))
    xb = blobs(args.n, centres, args.spread, rng)
    xq = blobs(max(args.queries, args.timing_queries), centres, args.spread, rng)
    times["data"] = time.perf_counter() - start
    exact_s, gt = exact_search(xb, xq[: args.queries], args.k, args.clock)
    times["exact search"] = exact_s
    factory = args.factory or choose_factory(args.n, args.d, memory_bytes=args.memory_gb * 2**30)
    if ivf_of(make_index(factory, args.d)[0]) is None:
        raise SystemExit(f"{factory} at n={args.n}: pass a larger --n or an IVF --factory")
    factory, one, variants, times["train"], times["add"] = build(
        factory, xb, args.shards, args.seed
    )
    start = time.perf_counter()
    rows = sweep(one, variants, xq, gt, args.queries / exact_s, args)
    tuned = tuned_nprobe(variants[0], xb, args.k, args.seed)
    times["sweep+tune"] = time.perf_counter() - start
    report(args, factory, rows, args.queries / exact_s, tuned, times)


if __name__ == "__main__":
    main(parse_args())
