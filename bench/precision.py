"""bf16 autocast against float32 on CPU: training throughput, R@1 after the same steps, and
where the time goes.

    python bench/precision.py [--data ../shared/data/openmoji-dev] [--steps 200] [--workers 2]
                              [--config YAML] [--set model.image.name=resnet18 ...] [--skip-runs]

1. Two training runs with ``oclear_ray.train.fit`` (Ray Train, the same workers, cores, model,
   data and steps), ``run.precision`` fp32 then bf16: the run's samples/s (every step after the
   first, data waits included) and R@1 / MAP@R of the exported model on the set's eval queries
   (exact search, whole catalog, fused documents).
2. One in-process step of the same model on a fixed batch (1 thread, as each worker runs),
   profiled in both precisions: the ops that take the time, their milliseconds in fp32 and in
   bf16 and the ratio, so that an op that does not speed up (or stays in float32 under
   autocast) shows.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import tempfile
import time

import torch
import yaml

from oclear_ray.classifier import ClassifierConfig, ShardedMarginSoftmax
from oclear_ray.config import load_config
from oclear_ray.model import RetrievalModel
from oclear_ray.train import Batch, autocast, train_step

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(HERE, "../../shared/data/openmoji-dev"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-runs", action="store_true", help="only the in-process profile")
    return p.parse_args()


def overrides(pairs: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}


def _score(model_dir: str, data: str) -> dict:
    sys.path.insert(0, HERE)  # bench/train.py imports its neighbour baselines.py
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(HERE, "train.py"))
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    return bench_train.score(model_dir, data)["fused"]


def runs(args) -> dict:
    from oclear_ray.runtime import init_ray
    from oclear_ray.train import fit

    init_ray()
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(
            args.config,
            {**overrides(args.set), "run.workers": args.workers, "run.precision": precision},
        ).with_total_steps(args.steps)
        t0 = time.time()
        result = fit(
            cfg,
            catalog=os.path.join(args.data, "catalog.parquet"),
            queries=os.path.join(args.data, "train_queries.parquet"),
            workdir=tempfile.mkdtemp(prefix=f"oclear-bench-precision-{precision}-"),
        )
        scores = _score(result.model_dir, args.data)
        out[precision] = {
            "samples_per_s": result.metrics["run_samples_per_s"],
            "data_wait": result.metrics["run_data_wait"],
            "wall_s": time.time() - t0,
            **scores,
        }
        print(
            f"run {precision}: {out[precision]['samples_per_s']:.1f} samples/s "
            f"(data wait {out[precision]['data_wait']:.0%}), R@1 {scores['recall@1']:.3f}, "
            f"MAP@R {scores['map@r']:.3f}, {out[precision]['wall_s']:.0f} s",
            flush=True,
        )
    return out


def _fixed_batch(cfg) -> Batch:
    gen = torch.Generator().manual_seed(0)
    s, b, q, t = cfg.model.preprocess.image_size, cfg.data.batch_size, cfg.data.query_batch_size, 20
    return Batch(
        doc_images=torch.randn(b, 3, s, s, generator=gen),
        doc_ids=torch.randint(5, 1000, (b, t), generator=gen),
        doc_mask=torch.ones(b, t, dtype=torch.long),
        doc_labels=torch.randint(0, 2000, (b,), generator=gen),
        query_images=torch.randn(q, 3, s, s, generator=gen),
        query_labels=torch.randint(0, 2000, (q,), generator=gen),
    )


def _step(cfg, model, head, batch) -> None:
    """Forward and backward of one align step (no optimizer: the same weights every time)."""
    with autocast(cfg, torch.device("cpu")):
        loss = train_step(model, head, batch, towers="image")
    loss.backward()
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)


def profile(args) -> dict:
    """Per op, self CPU ms of one align step in fp32 and bf16; and the step time of each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(1)
    per_op, step = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(args.config, {**overrides(args.set), "run.precision": precision})
        torch.manual_seed(0)
        model = RetrievalModel(cfg.model)
        head = ShardedMarginSoftmax(
            ClassifierConfig.of(cfg.head, num_classes=2000, dim=cfg.model.embed_dim)
        )
        batch = _fixed_batch(cfg)
        for _ in range(3):
            _step(cfg, model, head, batch)
        t0 = time.perf_counter()
        for _ in range(3):
            _step(cfg, model, head, batch)
        step[precision] = (time.perf_counter() - t0) / 3
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(cfg, model, head, batch)
        times = collections.Counter()
        for event in prof.key_averages():
            times[event.key] += event.self_cpu_time_total / 1000.0
        per_op[precision] = times
    print(
        f"step (1 thread, {cfg.model.image.name} at {cfg.model.preprocess.image_size} px): "
        f"fp32 {step['fp32'] * 1000:.0f} ms, bf16 {step['bf16'] * 1000:.0f} ms, "
        f"speed-up {step['fp32'] / step['bf16']:.2f}x"
    )
    total = sum(per_op["fp32"].values())
    for name, ms in per_op["fp32"].most_common(8):
        half = per_op["bf16"].get(name, 0.0)
        ratio = f"{ms / half:.2f}x" if half else "-"
        print(f"  {name:<36} fp32 {ms:7.1f} ms ({ms / total:4.0%})  bf16 {half:7.1f} ms  {ratio}")
    return {"step_s": step}


def main(args):
    prof = profile(args)
    if args.skip_runs:
        return
    out = runs(args)
    fp32, bf16 = out["fp32"], out["bf16"]
    print(
        f"bf16 / fp32: samples/s {bf16['samples_per_s'] / fp32['samples_per_s']:.2f}x "
        f"(goal >= 1.5), R@1 {100 * (bf16['recall@1'] - fp32['recall@1']):+.1f} points "
        f"(goal within 1); in-process step {prof['step_s']['fp32'] / prof['step_s']['bf16']:.2f}x"
    )


if __name__ == "__main__":
    main(parse_args())
