"""Ray Data ingest for training: decode, resize, augment and tokenise outside the trainers.

``PrepareBatches`` decodes and tokenises once (it loads the tokenizer once per actor);
``augment_docs`` / ``augment_queries`` draw new views every epoch. ``photo_view`` (torchvision
``transforms.v2``) turns a clean catalog image into something like a user's photo of it (crop,
rotation, colour, grey or edges, blur), ``outline_view`` into a line drawing of it; either
trains the query tower on every class that has documents, also on classes no query was ever
taken of.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage
from torchvision.transforms import v2

from oclear_ray.preprocess import PreprocessConfig, decode_image
from oclear_ray.text import TextTokenizer


def _edges(img: Image.Image) -> Image.Image:
    """An outline drawing of a photo: its strong edges, dark on white."""
    edges = ImageOps.grayscale(img).filter(ImageFilter.FIND_EDGES)
    edges = ImageOps.crop(edges, 1)  # the filter marks the frame itself as an edge
    return ImageOps.invert(ImageOps.autocontrast(ImageOps.expand(edges, 1))).convert("RGB")


def backdrop(img: Image.Image) -> Image.Image:
    """The item on a random backdrop instead of its plain catalog background: the pixels that
    match the image's border colour (when the border is one colour) and are not enclosed by
    the item become a smooth field of a few muted random colours. A user's photo is rarely
    taken on the catalog's white; an image without a plain border is returned as it is. Draws
    from torch's generator."""
    a = np.asarray(img, dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    colour = np.median(border, axis=0)
    if np.abs(border - colour).max(axis=1).mean() > 12:
        return img
    item = ndimage.binary_fill_holes(np.abs(a - colour).max(axis=2) > 24)  # its own whites stay
    item = ndimage.binary_dilation(item).astype(np.float32)[..., None]
    cells = int(torch.randint(2, 6, ()))
    grey = 70 + 150 * torch.rand(cells, cells, 1)
    field = (grey + 0.4 * (255 * torch.rand(cells, cells, 3) - grey)).clamp(0, 255)
    field = Image.fromarray(field.numpy().astype(np.uint8), "RGB").resize(
        img.size, Image.Resampling.BICUBIC
    )
    out = item * a + (1 - item) * np.asarray(field, dtype=np.float32)
    return Image.fromarray(out.astype(np.uint8))


def light_view(size, strength: float = 1.0) -> v2.Transform:
    """A catalog shot, slightly moved: a mild crop."""
    return v2.RandomResizedCrop(size, scale=(1.0 - 0.2 * strength, 1.0), ratio=(1.0, 1.0))


def photo_view(size, strength: float = 1.0) -> v2.Transform:
    """A user-photo-like view (torchvision): crop, rotation, a random backdrop, lighting and
    colour, grey or edges, blur; ``strength`` scales every range and probability (1 the
    default, 0 none)."""
    s = strength
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(1.0 - 0.45 * s, 1.0), ratio=(1.0, 1.0)),
            v2.RandomRotation(20.0 * s, interpolation=v2.InterpolationMode.BILINEAR, fill=255),
            v2.RandomApply([v2.Lambda(backdrop)], p=min(1.0, 0.6 * s)),
            v2.ColorJitter(
                brightness=0.4 * s, contrast=0.4 * s, saturation=(max(0.0, 1 - s), 1 + 0.6 * s)
            ),
            v2.RandomGrayscale(0.2 * s),
            v2.RandomApply([v2.Lambda(_edges)], p=min(1.0, 0.15 * s)),
            v2.RandomApply([v2.GaussianBlur(3, sigma=(0.3, 1.2))], p=min(1.0, 0.3 * s)),
        ]
    )


def outline_view(img: Image.Image) -> Image.Image:
    """A line drawing of a catalog image: its ink, the brightest channel as grey (black
    outlines stay, coloured fills read as paper, as a line-art set draws a colour drawing: the
    shape code's ``ink`` levels), mildly cropped. On openmoji-dev's training queries it matches
    the set's own line art of the document (median pixel cosine 0.998, against 0.72 for the
    thresholded, thickened dark pixels it replaced)."""
    ink = Image.fromarray(np.asarray(img.convert("RGB")).max(-1)).convert("RGB")
    return v2.RandomResizedCrop(img.size[::-1], scale=(0.85, 1.0), ratio=(1.0, 1.0))(ink)


def _ink(img: Image.Image) -> np.ndarray:
    """How dark each pixel is, [H, W] in [0, 1] (0 white paper, 1 black ink)."""
    return 1.0 - np.asarray(ImageOps.grayscale(img), dtype=np.float32) / 255.0


def _hue(rng: np.random.Generator) -> np.ndarray:
    """A random ink colour, RGB in [0, 255]: any hue, mostly saturated, sometimes near black."""
    h, s, v = rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.2, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + 6 * h) % 6
    return 255 * v * (1 - s * np.clip(np.minimum(k, 4 - k), 0, 1))


def _duotone(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The drawing re-inked in one random colour on white (a monochrome mark shown in its
    brand's colour, or a colour item printed in one ink)."""
    ink = _ink(img)[..., None]
    return Image.fromarray((255 - ink * (255 - _hue(rng))).astype(np.uint8))


def _badge(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The drawing knocked out in white from a coloured tile around it (an app-icon-like
    rendering)."""
    ink = _ink(img)
    rows, cols = np.flatnonzero(ink.max(1) > 0.2), np.flatnonzero(ink.max(0) > 0.2)
    if not len(rows):
        return img
    h, w = ink.shape
    pad = int(rng.integers(1, max(2, h // 8)))
    top, bottom = max(0, rows[0] - pad), min(h, rows[-1] + pad + 1)
    left, right = max(0, cols[0] - pad), min(w, cols[-1] + pad + 1)
    out = np.full((h, w, 3), 255.0, np.float32)
    tile = ink[top:bottom, left:right, None]
    out[top:bottom, left:right] = tile * 255 + (1 - tile) * _hue(rng)
    return Image.fromarray(out.astype(np.uint8))


#: the renderings ``render_view`` draws from, with their odds
RENDERINGS = {
    "colour": 0.2,  # as drawn, colour jittered
    "grey": 0.1,
    "duotone": 0.25,
    "badge": 0.1,
    "outline": 0.2,
    "edges": 0.15,
}


def render_view(img: Image.Image, rng: np.random.Generator, strength: float = 1.0):
    """A view of a catalog image as another source may have drawn it: moved, scaled (often
    smaller, as beside a wordmark) and turned a little, then rendered in one of
    :data:`RENDERINGS` (re-inked in one colour, knocked out of a coloured tile, grey, line art,
    edges, or its own colours jittered), sometimes blurred. ``strength`` scales the geometry."""
    s = strength
    move = v2.RandomAffine(
        degrees=10.0 * s,
        translate=(0.1 * s, 0.1 * s),
        scale=(max(0.3, 1.0 - 0.4 * s), 1.0 + 0.1 * s),
        interpolation=v2.InterpolationMode.BILINEAR,
        fill=255,
    )
    img = move(img)
    kind = rng.choice(list(RENDERINGS), p=list(RENDERINGS.values()))
    if kind == "colour":
        img = v2.ColorJitter(saturation=0.5, hue=0.5)(img)  # white paper stays white
    elif kind == "grey":
        img = ImageOps.grayscale(img).convert("RGB")
    elif kind == "duotone":
        img = _duotone(img, rng)
    elif kind == "badge":
        img = _badge(img, rng)
    elif kind == "outline":
        img = outline_view(img)
    else:
        img = _edges(img)
    if rng.random() < 0.2:
        img = v2.GaussianBlur(3, sigma=(0.3, 1.0))(img)
    return img


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


def _seeded() -> np.random.Generator:
    """A fresh generator, and torch's (torchvision's draws) seeded from it: every Ray Data
    worker process would otherwise start torch from the same seed."""
    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(2**62)))
    return rng


def _views(pixels: np.ndarray, make_view) -> np.ndarray:
    out = [np.asarray(make_view(Image.fromarray(p)), dtype=np.uint8) for p in pixels]
    return np.stack(out) if out else pixels


def augment_docs(
    batch: dict,
    *,
    augment: bool,
    doc_as_query_rate: float,
    view: str = "photo",
    strength: float = 1.0,
    weights: np.ndarray | None = None,
) -> dict:
    """Per-epoch document views, plus query-like views (``view``: "photo", "outline" or
    "render") of a share of them as extra query samples (``query_image`` where
    ``has_query_image``); with class ``weights``, the rows are first resampled (``resample``)."""
    if weights is not None:
        batch = resample(batch, weights=weights)
    rng = _seeded()
    pixels = batch["image"]
    size = pixels.shape[1:3]
    if augment:
        batch["image"] = _views(pixels, light_view(size, strength))
    use = rng.random(len(pixels)) < doc_as_query_rate
    query = np.zeros_like(pixels)
    if use.any():
        make = {
            "photo": photo_view(size, strength),
            "outline": outline_view,
            "render": lambda i: render_view(i, rng, strength),
        }[view]
        query[use] = _views(pixels[use], make)
    batch["query_image"], batch["has_query_image"] = query, use
    return batch


def augment_queries(batch: dict, *, augment: bool, strength: float = 1.0) -> dict:
    """Per-epoch photo views of the query images."""
    if augment:
        _seeded()
        batch["image"] = _views(batch["image"], photo_view(batch["image"].shape[1:3], strength))
    return batch


def resample(batch: dict, *, weights: np.ndarray) -> dict:
    """Per-epoch class resampling: each row is drawn Poisson(weight of its class) times (a
    class's weight is its expected draws per document per epoch, from the sampling policy)."""
    copies = np.random.default_rng().poisson(weights[batch["label"]])
    rows = np.repeat(np.arange(len(copies)), copies)
    return {k: v[rows] for k, v in batch.items()}
