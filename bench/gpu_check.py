"""The library's GPU paths on one device, without Ray: what to run first on a new GPU machine.

    python bench/gpu_check.py [--device cuda|cpu] [--steps 300] [--backbone convnext_tiny]
                              [--image-size 224] [--batch 128] [--classes 2000]
                              [--config configs/gpu.yaml]

Needs only PyTorch, timm, transformers and pydantic (plus FAISS with GPUs for the last part). One
line of figures per part:

- ``train``: a world-size-1 process group (NCCL on CUDA, gloo on CPU), the encoders sharded with
  FSDP2 ``fully_shard`` (on CUDA with the bf16 ``MixedPrecisionPolicy`` of ``run.precision:
  bf16``), the sharded margin-softmax head on the default group, ``--steps`` steps of the
  library's ``train_step`` on a synthetic catalog in bf16 and the same steps in float32 from
  the same initial weights: samples/s, peak memory, the loss at the start and at the end, and
  the bf16 / float32 throughput ratio.
- ``embed``: the bf16 model exported and loaded back, documents (image + text) and query
  photos embedded by the exported encoders on the device (half precision on CUDA): items/s.
- ``faiss``: where FAISS sees GPUs, an IVF index trained on the GPU over the embedded documents
  (``oclear_ray.index.gpu_clustering_index``) and searched: recall@10 against exact search.

``--config`` takes a training config (e.g. ``configs/gpu.yaml``: its model, head and batch size)
instead of the check's own small text tower; its backbone starts from random weights, since
nothing is downloaded, and ``--backbone``, ``--image-size`` and ``--batch`` still override it.

The synthetic catalog: each class is a random smooth colour pattern; documents and query photos
are shifted, noisy views of it, and its title a few class-specific tokens, so the loss can fall.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from oclear_ray import parallel  # noqa: E402
from oclear_ray.classifier import ClassifierConfig, ShardedMarginSoftmax  # noqa: E402
from oclear_ray.config import TrainConfig, load_config  # noqa: E402
from oclear_ray.export import export_model, load_doc_encoder, load_query_encoder  # noqa: E402
from oclear_ray.model import RetrievalModel  # noqa: E402
from oclear_ray.text import train_tokenizer  # noqa: E402
from oclear_ray.train import (  # noqa: E402
    Batch,
    autocast,
    mixed_precision_policy,
    train_step,
)

WORDS = 64  # title vocabulary of the synthetic catalog


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--config", help="a training config's model, head and batch size")
    p.add_argument("--backbone", help="default: convnext_tiny, or the config's")
    p.add_argument("--image-size", type=int, help="default: 224, or the config's")
    p.add_argument(
        "--batch",
        type=int,
        help="documents per step (+ half as queries); default: 128, or the config's",
    )
    p.add_argument("--classes", type=int, default=2000)
    p.add_argument("--embed-docs", type=int, default=4096, help="at least 512 (2 chunks)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.embed_docs < 512 or args.steps < 10:
        p.error("--embed-docs must be >= 512 and --steps >= 10")
    return args


class Catalog:
    """Class prototypes [C, 3, S, S] in [-1, 1] and title tokens [C, 6]; views drawn on the
    device by a generator there (drawn on the CPU, a batch of 224 px noise costs more than a
    GPU's step)."""

    def __init__(self, classes: int, size: int, device: torch.device, seed: int):
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.rand(classes, 3, 6, 6, generator=gen) * 2 - 1
        self.prototypes = F.interpolate(coarse, size=(size, size), mode="bicubic").to(device)
        self.titles = torch.randint(5, 5 + WORDS, (classes, 6), generator=gen).to(device)
        self.classes = classes

    def views(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = self.prototypes[labels]
        shift = int(torch.randint(-4, 5, (1,), generator=gen, device=gen.device))
        noise = torch.randn(x.shape, generator=gen, device=gen.device)
        return torch.roll(x, shift, dims=3) + 0.3 * noise

    def batch(self, docs: int, gen: torch.Generator) -> Batch:
        labels = torch.randint(0, self.classes, (docs,), generator=gen, device=gen.device)
        queries = labels[: docs // 2]
        ids = self.titles[labels]
        return Batch(
            doc_images=self.views(labels, gen),
            doc_ids=ids,
            doc_mask=torch.ones_like(ids),
            doc_labels=labels,
            query_images=self.views(queries, gen),
            query_labels=queries,
        )


#: the check's own model and head, without ``--config``
OWN = {
    "model.image.name": "convnext_tiny",
    "model.text": {"vocab_size": 5 + WORDS, "max_position_embeddings": 16},
    "model.preprocess": {"image_size": 224, "max_text_length": 8},
    "head": {"margin": "cosface", "m": 0.2, "scale": 32.0, "sample_rate": 0.5},
    "optim": {"lr": 1e-3, "head_lr": 1e-3},
    "data.batch_size": 128,
}


def config(args, precision: str) -> TrainConfig:
    """``--config`` (its backbone from random weights) or the check's own, in ``precision``
    on one worker, with the command line's backbone, image size and batch."""
    overrides = {"model.image.pretrained": False} if args.config else copy.deepcopy(OWN)
    overrides |= {"run.precision": precision, "run.workers": 1}
    given = {"model.image.name": args.backbone, "data.batch_size": args.batch}
    given["model.preprocess.image_size"] = args.image_size
    overrides |= {k: v for k, v in given.items() if v is not None}
    return load_config(args.config, overrides)


def _memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, precision: str, catalog: Catalog, device: torch.device):
    """``args.steps`` steps: (model, samples/s, first and last loss, memory)."""
    cfg = config(args, precision)
    torch.manual_seed(args.seed)
    model = RetrievalModel(cfg.model).to(device)
    head = ShardedMarginSoftmax(
        ClassifierConfig.of(cfg.head, num_classes=args.classes, dim=cfg.model.embed_dim),
        world_size=dist.get_world_size(),
    ).to(device)
    policy = mixed_precision_policy(cfg, device)
    parallel.apply_fsdp(model, model.shard_units(), mp_policy=policy)
    # two optimizers, as in training: one AdamW's foreach step (CUDA's default) cannot mix the
    # encoders' DTensor parameters with the head's plain ones
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    head_optim = torch.optim.AdamW(head.parameters(), lr=cfg.optim.head_lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    losses, samples, start = [], 0, None
    for step in range(args.steps):
        if step == min(5, args.steps - 1):  # warm-up steps (kernel selection) not timed
            _sync(device)
            start, samples = time.perf_counter(), 0
        batch = catalog.batch(cfg.data.batch_size, gen)
        with autocast(cfg, device):
            loss = train_step(
                model, head, batch, towers="image" if step < args.steps // 2 else "all"
            )
        loss.backward()
        optim.step(), head_optim.step()
        optim.zero_grad(set_to_none=True), head_optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        samples += batch.doc_labels.shape[0] + batch.query_labels.shape[0]
    _sync(device)
    rate = samples / max(time.perf_counter() - start, 1e-9)
    first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    return model, cfg, rate, first, last, _memory(device)


def _full_model(model, cfg: TrainConfig) -> RetrievalModel:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    plain = RetrievalModel(cfg.model)
    plain.load_state_dict(get_model_state_dict(model, options=options))
    return plain.eval()


def embed(args, model, cfg, catalog: Catalog, device: torch.device):
    """Export, load both encoders on ``device``, embed documents and queries: rates, vectors."""
    texts = [" ".join(f"w{t}" for t in row.tolist()) for row in catalog.titles.cpu()]
    tokenizer = train_tokenizer(texts, vocab_size=5 + WORDS)  # fits the text tower's table
    plain = _full_model(model, cfg)
    rates, out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        export_model(plain, tokenizer, tmp)
        encoders = {"docs": load_doc_encoder(tmp), "queries": load_query_encoder(tmp)}
    gen = torch.Generator(device).manual_seed(args.seed + 2)
    labels = torch.arange(args.embed_docs) % catalog.classes
    chunks = labels.split(256)

    def encode(name, encoder, chunk):
        images = catalog.views(chunk.to(device), gen)
        if name == "docs":
            return encoder.encode_doc(images, [texts[c] for c in chunk.tolist()])
        return encoder.encode_query(images)

    for name, encoder in encoders.items():
        encoder.model.to(device)
        vectors = [encode(name, encoder, chunks[0])]  # the first chunk warms up, untimed
        _sync(device)
        start = time.perf_counter()
        vectors += [encode(name, encoder, chunk) for chunk in chunks[1:]]
        _sync(device)
        timed = args.embed_docs - len(chunks[0])
        rates[name] = timed / max(time.perf_counter() - start, 1e-9)
        out[name] = torch.cat(vectors).cpu()
    return rates, out


def faiss_check(vectors: dict) -> str:
    try:
        import faiss

        from oclear_ray.index import gpu_clustering_index
    except ImportError as exc:
        return f"skipped ({exc})"
    if faiss.get_num_gpus() == 0:
        return "skipped (this FAISS build sees no GPU)"
    xb = F.normalize(vectors["docs"], dim=1).numpy()
    xq = F.normalize(vectors["queries"], dim=1).numpy()
    index = faiss.index_factory(xb.shape[1], "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.clustering_index = gpu_clustering_index(ivf)
    t0 = time.perf_counter()
    index.train(xb)
    ivf.clustering_index = None
    index.add(xb)
    train_s = time.perf_counter() - t0
    ivf.nprobe = 8
    _, approx = index.search(xq, 10)
    _, exact = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    recall = sum(len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True)) / exact.size
    return f"IVF64 trained on GPU in {train_s:.2f} s, recall@10 vs exact {recall:.3f} (nprobe 8)"


def _init(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    _init(device)
    try:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        cfg = config(args, "bf16")
        size, batch = cfg.model.preprocess.image_size, cfg.data.batch_size
        print(
            f"device {name}, torch {torch.__version__}, {cfg.model.image.name} at {size} px, "
            f"batch {batch} docs + {batch // 2} queries, {args.classes} classes, "
            f"config {args.config or 'none (its own)'}"
        )
        catalog = Catalog(args.classes, size, device, args.seed)
        results = {}
        for precision in ("bf16", "fp32"):
            model, cfg, rate, first, last, memory = train(args, precision, catalog, device)
            results[precision] = dict(rate=rate, first=first, last=last)
            print(
                f"train {precision}: {rate:.1f} samples/s, {memory}, "
                f"loss {first:.3f} -> {last:.3f} over {args.steps} steps",
                flush=True,
            )
            if precision == "bf16":
                trained = (model, cfg)
            else:
                del model
        ratio = results["bf16"]["rate"] / results["fp32"]["rate"]
        print(f"train bf16 / fp32 samples/s: {ratio:.2f}x")
        rates, vectors = embed(args, *trained, catalog, device)
        print(
            f"embed: documents {rates['docs']:.1f}/s, query photos {rates['queries']:.1f}/s "
            f"({'half precision' if device.type == 'cuda' else 'float32'})"
        )
        print(f"faiss: {faiss_check(vectors)}")
        return {"train": results, "ratio": ratio, "embed": rates}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
