"""Ray Data ingest for training: decode, resize, augment and tokenise outside the trainers.

``PrepareBatches`` decodes and tokenises once (it loads the tokenizer once per actor);
``augment_docs`` / ``augment_queries`` draw new views every epoch. ``photo_view``
turns a clean catalog image into something like a user's photo of it (crop, rotation, colour,
blur, grey, occlusion), ``outline_view`` into a line drawing of it; either trains the query
tower on every class that has documents, also on classes no query was ever taken of.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from oclear_ray.preprocess import PreprocessConfig, decode_image
from oclear_ray.text import TextTokenizer


def _crop(img: Image.Image, rng: np.random.Generator, scale: tuple[float, float]) -> Image.Image:
    w, h = img.size
    s = np.sqrt(rng.uniform(*scale))
    cw, ch = max(4, int(w * s)), max(4, int(h * s))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)


def light_view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A catalog shot, slightly moved: a mild crop."""
    return _crop(img, rng, (0.8, 1.0))


def photo_view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A user-photo-like view: crop, rotation, lighting and colour, blur, grey or edges."""
    img = _crop(img, rng, (0.55, 1.0))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = img.rotate(float(rng.uniform(-20, 20)), Image.Resampling.BILINEAR, fillcolor=fill)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.6, 1.4)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.6, 1.4)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.0, 1.6)))
    u = rng.random()
    if u < 0.2:
        img = ImageOps.grayscale(img).convert("RGB")
    elif u < 0.35:  # outline drawing: strong edges on white
        edges = ImageOps.grayscale(img).filter(ImageFilter.FIND_EDGES)
        img = ImageOps.invert(ImageOps.autocontrast(edges)).convert("RGB")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    return img


def outline_view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A line drawing of a catalog image: its dark pixels (the outlines of a drawn item), a
    little thickened, black on white; mildly cropped."""
    grey = np.asarray(ImageOps.grayscale(img), dtype=np.float32)
    ink = Image.fromarray(((grey < float(rng.uniform(40, 80))) * 255).astype(np.uint8))
    if rng.random() < 0.7:
        ink = ink.filter(ImageFilter.MaxFilter(3))
    return _crop(ImageOps.invert(ink).convert("RGB"), rng, (0.85, 1.0))


DOC_QUERY_VIEWS = {"photo": photo_view, "outline": outline_view}


class PrepareBatches:
    """``map_batches`` class, run once per row: contract rows -> model-ready numpy arrays.

    Output columns: ``image`` uint8 [B, S, S, 3] (zeros for text-only rows), ``has_image``,
    ``input_ids`` and ``attention_mask`` int64 [B, T], ``label`` int64. Rows whose label is not
    in the class map are dropped: they cannot be classified.
    """

    def __init__(self, *, class_map: dict, tokenizer_path: str, preprocess: PreprocessConfig):
        self.class_map = class_map
        self.tokenizer = TextTokenizer.from_file(tokenizer_path)
        self.pre = preprocess

    def __call__(self, batch: pa.Table) -> dict:
        labels = [self.class_map.get(v, -1) for v in batch.column("label").to_pylist()]
        batch = batch.filter(pa.array([label >= 0 for label in labels]))
        images = batch.column("image").to_pylist()
        texts = batch.column("text").to_pylist()
        ids, mask = self.tokenizer.encode(texts, self.pre.max_text_length)
        blank = np.zeros((self.pre.image_size, self.pre.image_size, 3), np.uint8)
        pixels = [decode_image(b, self.pre) if b else blank for b in images]
        return {
            "image": np.stack(pixels) if pixels else blank[None][:0],
            "has_image": np.array([b is not None for b in images], dtype=bool),
            "input_ids": ids,
            "attention_mask": mask,
            "label": np.array([x for x in labels if x >= 0], dtype=np.int64),
        }


def _views(pixels: np.ndarray, make_view, rng: np.random.Generator) -> np.ndarray:
    out = [np.asarray(make_view(Image.fromarray(p), rng), dtype=np.uint8) for p in pixels]
    return np.stack(out) if out else pixels


def augment_docs(
    batch: dict, *, augment: bool, doc_as_query_rate: float, view: str = "photo"
) -> dict:
    """Per-epoch document views, plus query-like views (``view``: "photo" or "outline") of a
    share of them as extra query samples (``query_image`` where ``has_query_image``)."""
    rng = np.random.default_rng()
    pixels = batch["image"]
    if augment:
        batch["image"] = _views(pixels, light_view, rng)
    use = rng.random(len(pixels)) < doc_as_query_rate
    query = np.zeros_like(pixels)
    if use.any():
        query[use] = _views(pixels[use], DOC_QUERY_VIEWS[view], rng)
    batch["query_image"], batch["has_query_image"] = query, use
    return batch


def augment_queries(batch: dict, *, augment: bool) -> dict:
    """Per-epoch photo views of the query images."""
    if augment:
        batch["image"] = _views(batch["image"], photo_view, np.random.default_rng())
    return batch


def resample(batch: dict, *, weights: np.ndarray) -> dict:
    """Per-epoch class resampling: each row is drawn Poisson(weight of its class) times (a
    class's weight is its expected draws per document per epoch, from the sampling policy)."""
    copies = np.random.default_rng().poisson(weights[batch["label"]])
    rows = np.repeat(np.arange(len(copies)), copies)
    return {k: v[rows] for k, v in batch.items()}
