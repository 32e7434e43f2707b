"""Synthetic product catalog: a seeded test bed for skew, label noise, aliased and broad classes.

A class is a product: a type (mug, tote bag, ...), a body shape, a colour, a pattern with a
second colour, and a printed mark (a letter, a digit or a small glyph on a badge). Documents
are slightly varied catalog shots of the product on a plain light background, titled by its
attributes; queries are "user photos" of the same product, framed as a person aims a phone
(muted clutter, scale, rotation, skew, occlusion, blur, lighting, JPEG): hard, but learnable
(pixel k-NN finds the product well above chance). Class sizes follow a Zipf law and the
governance problems the method exists for are injected on purpose, then recorded in
``truth.json``:

- ``noise``: fraction of documents whose ``label`` is replaced by another product's label;
- ``alias_rate``: fraction of products whose documents are split across two labels;
- ``broad_rate``: fraction of products merged pairwise under one label (one label, two products).

Output is a function of the seed only: the plan (products, sizes, labels, splits) comes from one
generator, and each document and query is drawn from its own generator seeded by
``(seed, stream, index)``, so the bytes do not depend on the order of drawing.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from oclear_ray import storage
from oclear_ray.contract import columns

# What ``generate`` writes: the contract's columns (no image paths), and a price per document.
CATALOG_SCHEMA = columns("doc_id", "image", "text", "category", "label", price=pa.float64())
QUERY_SCHEMA = columns("query_id", "image", "text", "label")
FILES = {
    "catalog": "catalog.parquet",
    "queries": "queries.parquet",
    "eval_queries": "eval_queries.parquet",
    "truth": "truth.json",
}

# An aliased product has at least this many documents, so both its labels hold >= 2 of them.
ALIAS_MIN_DOCS = 6
# Seed streams: the plan, then one generator per document and per query.
_PLAN, _DOCS, _QUERIES, _MORE_PHOTOS = 0, 1, 2, 3


class _Part(NamedTuple):
    """A trim part in body-relative coordinates (the body box is the unit square)."""

    prim: str  # "rect", "oval", "ring" (an outline) or "poly"
    coords: tuple[float, ...]
    front: bool = False  # drawn over the body rather than behind it


class _Kind(NamedTuple):
    """A product type: its category path, title nouns, body box in the unit canvas, trim."""

    category: str
    nouns: tuple[str, ...]
    body: tuple[float, float, float, float]
    parts: tuple[_Part, ...]
    price: float


# Product types. Body boxes are in the unit canvas; trim parts are relative to the body box.
# fmt: off
KINDS: dict[str, _Kind] = {
    "mug": _Kind("home/kitchen/mug", ("mug", "coffee mug", "cup"), (0.20, 0.28, 0.64, 0.80), (
        _Part("ring", (0.78, 0.22, 1.30, 0.74)),), 12.0),
    "teapot": _Kind("home/kitchen/teapot", ("teapot", "tea pot"), (0.26, 0.40, 0.74, 0.82), (
        _Part("ring", (0.78, 0.10, 1.25, 0.70)),
        _Part("poly", (0.10, 0.40, -0.38, 0.0, -0.26, -0.06, 0.18, 0.22)),
        _Part("oval", (0.38, -0.20, 0.62, 0.05))), 35.0),
    "coaster": _Kind(
        "home/kitchen/coaster", ("coaster", "drink coaster"), (0.18, 0.18, 0.82, 0.82), (), 6.0),
    "vase": _Kind("home/decor/vase", ("vase", "flower vase"), (0.26, 0.42, 0.74, 0.88), (
        _Part("rect", (0.32, -0.50, 0.68, 0.05)), _Part("rect", (0.24, -0.60, 0.76, -0.46))), 28.0),
    "clock": _Kind("home/decor/clock", ("clock", "desk clock"), (0.20, 0.14, 0.80, 0.74), (
        _Part("rect", (0.12, 0.96, 0.28, 1.12)), _Part("rect", (0.72, 0.96, 0.88, 1.12)),
        _Part("oval", (0.42, -0.12, 0.58, 0.04))), 30.0),
    "lamp": _Kind("home/lighting/lamp", ("lamp", "table lamp"), (0.20, 0.10, 0.80, 0.46), (
        _Part("rect", (0.45, 0.95, 0.55, 2.05)), _Part("oval", (0.18, 1.95, 0.82, 2.25))), 45.0),
    "cushion": _Kind("home/textiles/cushion", ("cushion", "throw pillow"), (0.16, 0.20, 0.84, 0.80),
        tuple(_Part("oval", (u - 0.07, v - 0.07, u + 0.07, v + 0.07), True)
              for u in (0.0, 1.0) for v in (0.0, 1.0)), 22.0),
    "rug": _Kind("home/textiles/rug", ("rug", "mat"), (0.12, 0.26, 0.88, 0.74), (
        _Part("rect", (-0.07, 0.0, 0.01, 1.0)), _Part("rect", (0.99, 0.0, 1.07, 1.0))), 60.0),
    "box": _Kind("home/storage/box", ("storage box", "box"), (0.16, 0.36, 0.84, 0.86), (
        _Part("rect", (-0.05, -0.14, 1.05, 0.12), True),), 15.0),
    "tote": _Kind("fashion/bags/tote", ("tote bag", "tote", "shopping bag"),
        (0.20, 0.42, 0.80, 0.88), (
        _Part("ring", (0.14, -0.60, 0.46, 0.30)), _Part("ring", (0.54, -0.60, 0.86, 0.30))), 18.0),
    "backpack": _Kind("fashion/bags/backpack", ("backpack", "rucksack"), (0.24, 0.22, 0.76, 0.86), (
        _Part("ring", (0.36, -0.16, 0.64, 0.10)), _Part("rect", (-0.10, 0.12, 0.04, 0.88)),
        _Part("rect", (0.96, 0.12, 1.10, 0.88))), 55.0),
    "t-shirt": _Kind("fashion/clothing/t-shirt", ("t-shirt", "tee"), (0.32, 0.26, 0.68, 0.88), (
        _Part("poly", (0.10, 0.0, -0.62, 0.22, -0.45, 0.50, 0.10, 0.36)),
        _Part("poly", (0.90, 0.0, 1.62, 0.22, 1.45, 0.50, 0.90, 0.36)),
        _Part("oval", (0.34, -0.07, 0.66, 0.07), True)), 20.0),
    "cap": _Kind("fashion/cap", ("cap", "baseball cap"), (0.22, 0.26, 0.78, 0.68), (
        _Part("oval", (-0.16, 0.78, 1.16, 1.14), True),
        _Part("oval", (0.44, -0.08, 0.56, 0.04))), 16.0),
    "phone case": _Kind("electronics/phone-case", ("phone case", "phone cover"),
        (0.32, 0.10, 0.68, 0.90), (_Part("rect", (0.10, 0.04, 0.42, 0.18), True),), 14.0),
    "speaker": _Kind("electronics/audio/speaker", ("speaker", "bluetooth speaker"),
        (0.25, 0.12, 0.75, 0.88), (
        _Part("ring", (0.34, 0.04, 0.66, 0.25), True),
        _Part("ring", (0.26, 0.72, 0.74, 0.97), True)), 70.0),
    "bottle": _Kind("sports/bottle", ("water bottle", "bottle"), (0.34, 0.32, 0.66, 0.90), (
        _Part("rect", (0.26, -0.22, 0.74, 0.02)),
        _Part("rect", (0.20, -0.40, 0.80, -0.20), True)), 19.0),
    "notebook": _Kind("office/notebook", ("notebook", "journal"), (0.26, 0.12, 0.78, 0.88),
        tuple(_Part("ring", (-0.08, 0.08 + 0.168 * k, 0.08, 0.15 + 0.168 * k), True)
              for k in range(5)), 9.0),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40), "orange": (236, 128, 32), "yellow": (238, 200, 40),
    "green": (52, 150, 64), "teal": (28, 140, 140), "blue": (40, 84, 204),
    "navy": (26, 36, 100), "purple": (122, 52, 162), "pink": (236, 122, 172),
    "brown": (122, 76, 40), "black": (32, 32, 32), "grey": (128, 128, 128),
    "white": (246, 246, 246),
}
# Title wording: the first word is the usual one, the others are variants. A colour without
# variants is named as in COLOURS; the shapes and the patterns are the keys of their wording.
_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"), "blue": ("blue", "cobalt"), "navy": ("navy", "dark blue"),
    "purple": ("purple", "violet"), "pink": ("pink", "rose"), "teal": ("teal", "turquoise"),
    "grey": ("grey", "gray"), "white": ("white", "off-white"),
}
# fmt: on
_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "round": ("round", "circular"),
    "square": ("square", "boxy"),
    "rounded": ("rounded", "soft-edged"),
    "tall": ("tall", "slim"),
    "hexagonal": ("hexagonal", "six-sided"),
}
_PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain"),
    "striped": ("striped", "stripe", "banded"),
    "dotted": ("dotted", "polka-dot", "spotted"),
    "checked": ("checked", "check", "plaid"),
    "gradient": ("gradient", "ombre", "fade"),
    "diagonal": ("diagonal-striped", "diagonal stripe", "slanted-stripe"),
    "chevron": ("chevron", "zigzag"),
}
SHAPES = tuple(_SHAPE_WORDS)
PATTERNS = tuple(_PATTERN_WORDS)
_PATTERN_WEIGHTS = (0.28, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12)
GLYPHS = ("star", "heart", "plus", "ring", "triangle", "diamond")
# No I, O, 0 or 1: they are too alike once printed at 64 px.
MARKS = tuple("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") + GLYPHS
_COLOURINGS = 1 + (len(PATTERNS) - 1) * (len(COLOURS) - 1)  # per main colour; solid has one
# An eighth of the attribute space, which keeps the rejection sampling of products fast.
MAX_CLASSES = len(KINDS) * len(SHAPES) * len(COLOURS) * _COLOURINGS * len(MARKS) // 8

_TITLES = (
    "{colour} {pattern} {shape} {noun}, {mark}",
    "{shape} {noun} in {colour}, {pattern}, {mark}",
    "{noun} - {colour} {pattern} - {shape} - {mark}",
    "{colour} {noun} with {pattern} pattern, {shape}, {mark}",
    "{mark}: {shape} {colour} {pattern} {noun}",
)
_LETTER_MARKS = ("mark {}", "with {} print", "{} logo", "printed {}")
_GLYPH_MARKS = ("{} mark", "with {} print", "{} logo", "printed {}")

_LIGHT_BACKGROUNDS = ((255, 255, 255), (246, 246, 246), (250, 248, 242), (240, 244, 248))
_BADGE, _INK = (250, 250, 246), (24, 24, 24)
_SKIN = ((224, 172, 140), (198, 134, 96), (141, 85, 54), (241, 194, 160))


def _star(points: int = 5, outer: float = 0.8, inner: float = 0.34) -> tuple[float, ...]:
    """Vertices of a star polygon, flattened, in badge-radius units."""
    angles = np.pi * np.arange(2 * points) / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return tuple(
        float(v)
        for xy in zip(radii * np.cos(angles), radii * np.sin(angles), strict=True)
        for v in xy
    )


_GLYPH_PARTS: dict[str, tuple[_Part, ...]] = {
    "star": (_Part("poly", _star()),),
    "heart": (
        _Part("oval", (-0.62, -0.55, 0.02, 0.08)),
        _Part("oval", (-0.02, -0.55, 0.62, 0.08)),
        _Part("poly", (-0.6, -0.15, 0.6, -0.15, 0.0, 0.68)),
    ),
    "plus": (_Part("rect", (-0.62, -0.18, 0.62, 0.18)), _Part("rect", (-0.18, -0.62, 0.18, 0.62))),
    "ring": (_Part("ring", (-0.58, -0.58, 0.58, 0.58)),),
    "triangle": (_Part("poly", (0.0, -0.62, 0.64, 0.5, -0.64, 0.5)),),
    "diamond": (_Part("poly", (0.0, -0.72, 0.5, 0.0, 0.0, 0.72, -0.5, 0.0)),),
}


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What to generate. Rates are fractions in [0, 1].

    docs, classes: catalog size and number of products (true classes; every product gets at
        least one document). Labels: classes + aliased products - broad pairs.
    queries_per_class: queries drawn per product; eval_fraction of them are held out, by
        canonical label (split="class": eval classes have no training query) or per query
        (split="random").
    noise: fraction of documents whose label is replaced by a uniformly drawn label of another
        product (one clean document per product and label is kept, so none vanishes).
    alias_rate: fraction of products whose documents are split across two labels, drawn among
        products with at least ``ALIAS_MIN_DOCS`` documents (fewer when there are not enough):
        the second label is a name in real use, with a third to a half of the documents (at
        least 2); queries carry the canonical one, which keeps the rest.
    broad_rate: fraction of products merged pairwise (same product type when possible) under
        one label; queries of both products carry that label.
    zipf: exponent of the class-size law (0 = uniform; 1 = a few huge classes, a long tail).
    empty_text_rate: fraction of documents with an empty title.
    text_query_rate: fraction of queries that carry a short typed text ("red striped mug");
        text_only_rate of those have no image (a typed query), the rest are photo + text.
    image_size: side of the square images in pixels; row_group_size: parquet rows per group.
    """

    docs: int = 2000
    classes: int = 300
    queries_per_class: int = 2
    eval_fraction: float = 0.5
    split: str = "class"
    noise: float = 0.0
    alias_rate: float = 0.05
    broad_rate: float = 0.05
    zipf: float = 1.0
    empty_text_rate: float = 0.05
    text_query_rate: float = 0.0
    text_only_rate: float = 0.5
    image_size: int = 64
    row_group_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("docs", self.docs, 1)
        _check_int("classes", self.classes, 1, MAX_CLASSES)
        if self.classes > self.docs:
            raise ValueError(
                f"classes={self.classes} must be <= docs={self.docs}: "
                "every class gets at least one document"
            )
        _check_int("queries_per_class", self.queries_per_class, 0)
        _check_int("image_size", self.image_size, 16, 1024)
        _check_int("row_group_size", self.row_group_size, 1)
        _check_int("seed", self.seed, 0)
        self._check_rates()
        if self.split not in ("class", "random"):
            raise ValueError(f"split={self.split!r} must be 'class' or 'random'")

    def _check_rates(self) -> None:
        rates = ("eval_fraction", "alias_rate", "broad_rate", "empty_text_rate")
        for name in (*rates, "text_query_rate", "text_only_rate"):
            _check_float(name, getattr(self, name), 0.0, 1.0)
        _check_float("noise", self.noise, 0.0, 0.95)
        _check_float("zipf", self.zipf, 0.0, 10.0)
        if self.alias_rate + 2 * self.broad_rate > 1:
            raise ValueError(
                f"alias_rate={self.alias_rate} + 2 * broad_rate={self.broad_rate} must be <= 1: "
                "a product is aliased, in a broad pair, or neither"
            )

    @property
    def total_items(self) -> int:
        """Documents plus queries: the total a progress bar counts up to."""
        return self.docs + self.classes * self.queries_per_class


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise ValueError naming the field unless low <= value (<= high) and it is an int."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} must be {bound}")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    """Raise ValueError naming the field unless value is a number in [low, high]."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be a number in [{low}, {high}]")


@dataclass(frozen=True)
class Product:
    """The attributes that make a product (a true class)."""

    kind: str
    shape: str
    colour: str
    pattern: str
    secondary: str | None  # the pattern's second colour; None when solid
    mark: str


@dataclass(frozen=True)
class _Plan:
    """Everything decided before drawing: products, documents, labels, noise, queries."""

    products: list[Product]
    sizes: np.ndarray  # documents per product
    price_factor: np.ndarray  # per product
    doc_product: np.ndarray  # per document
    doc_true: np.ndarray  # label index per document before noise
    doc_label: np.ndarray  # label index per document after noise
    label_names: list[str]
    canonical: np.ndarray  # label index per product (what its queries carry)
    alias: np.ndarray  # second label index per product, -1 when not aliased
    broad_pairs: list[tuple[int, int]]
    query_product: np.ndarray
    query_eval: np.ndarray  # bool per query

    @property
    def doc_ids(self) -> list[str]:
        return _ids("d", len(self.doc_product))

    @property
    def query_ids(self) -> list[str]:
        return _ids("q", len(self.query_product))


def _ids(prefix: str, count: int) -> list[str]:
    """Zero-padded ids (at least 6 digits) in index order."""
    width = max(6, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for (seed, stream, index): draws do not depend on order."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *key])))


# ---------------------------------------------------------------------------------------------
# The plan


def zipf_sizes(docs: int, classes: int, exponent: float) -> np.ndarray:
    """Class sizes by rank summing to docs: one each, the rest shared as rank**-exponent.

    The shares are rounded by largest remainder, so the result is exact and deterministic.
    """
    weights = np.arange(1, classes + 1, dtype=np.float64) ** -exponent
    extra = (docs - classes) * weights / weights.sum()
    sizes = 1 + np.floor(extra).astype(np.int64)
    remainder = extra - np.floor(extra)
    sizes[np.argsort(-remainder, kind="stable")[: docs - int(sizes.sum())]] += 1
    return sizes


def _draw_attributes(rng: np.random.Generator, count: int) -> list[tuple]:
    """Draw count attribute tuples (duplicates possible); solid items have no second colour."""
    kinds, colours = list(KINDS), list(COLOURS)
    kind = rng.integers(len(kinds), size=count)
    shape = rng.integers(len(SHAPES), size=count)
    colour = rng.integers(len(colours), size=count)
    pattern = rng.choice(len(PATTERNS), size=count, p=_PATTERN_WEIGHTS)
    second = (colour + 1 + rng.integers(len(colours) - 1, size=count)) % len(colours)
    mark = rng.integers(len(MARKS), size=count)
    return [
        (kinds[k], SHAPES[s], colours[c], PATTERNS[p], colours[o] if p else None, MARKS[m])
        for k, s, c, p, o, m in zip(kind, shape, colour, pattern, second, mark, strict=True)
    ]


def _sample_products(rng: np.random.Generator, count: int) -> list[Product]:
    """count distinct products, by rejection of repeated attribute combinations."""
    seen: dict[tuple, None] = {}
    while len(seen) < count:
        for attributes in _draw_attributes(rng, 2 * (count - len(seen)) + 16):
            seen.setdefault(attributes)
            if len(seen) == count:
                break
    return [Product(*attributes) for attributes in seen]


def _pick_governance(
    rng: np.random.Generator, products: list[Product], sizes: np.ndarray, config: SynthConfig
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Choose the aliased products (>= ALIAS_MIN_DOCS documents) and the broad pairs (same
    type first)."""
    eligible = np.flatnonzero(sizes >= ALIAS_MIN_DOCS)
    n_alias = min(round(config.alias_rate * len(sizes)), len(eligible))
    aliased = np.sort(rng.choice(eligible, n_alias, replace=False))
    free = rng.permutation(np.setdiff1d(np.arange(len(sizes)), aliased))
    by_kind: dict[str, list[int]] = {}
    for p in free.tolist():
        by_kind.setdefault(products[p].kind, []).append(p)
    same = [(g[i], g[i + 1]) for g in by_kind.values() for i in range(0, len(g) - 1, 2)]
    odd = [g[-1] for g in by_kind.values() if len(g) % 2]
    cross = [(odd[i], odd[i + 1]) for i in range(0, len(odd) - 1, 2)]
    pairs = [same[i] for i in rng.permutation(len(same))] + cross
    return aliased, pairs[: round(config.broad_rate * len(sizes))]


def _docs_of(doc_product: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Document indices of each product, ascending."""
    return np.split(np.argsort(doc_product, kind="stable"), np.cumsum(sizes)[:-1])


def _label_slots(
    count: int, aliased: np.ndarray, pairs: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Label indices: canonical per product (a broad pair shares one), second per aliased."""
    partner_of = {b: a for a, b in pairs}
    canonical = np.full(count, -1, dtype=np.int64)
    slots = 0
    for p in range(count):
        if p not in partner_of:
            canonical[p], slots = slots, slots + 1
    for b, a in partner_of.items():
        canonical[b] = canonical[a]
    alias = np.full(count, -1, dtype=np.int64)
    alias[aliased] = np.arange(slots, slots + len(aliased))
    return canonical, alias, slots + len(aliased)


def _split_aliases(
    rng: np.random.Generator, docs_of: list[np.ndarray], alias: np.ndarray, labels: np.ndarray
) -> None:
    """Give a third (at least 2) to a half of each aliased product's documents its second label:
    a name in use, not a stray document (which 30 % label noise would make indistinguishable
    from a noisy one)."""
    for p in np.flatnonzero(alias >= 0):
        docs = docs_of[p]
        share = int(rng.integers(max(2, -(-len(docs) // 3)), len(docs) // 2 + 1))
        moved = rng.choice(docs, share, replace=False)
        labels[moved] = alias[p]


def _corrupt(
    rng: np.random.Generator,
    doc_product: np.ndarray,
    true: np.ndarray,
    own: np.ndarray,
    noise: float,
) -> np.ndarray:
    """Labels after noise: round(noise * docs) documents get a label of another product.

    own[p] holds product p's labels (canonical, second or -1). The first document of each
    (product, label) stays clean so no class loses its last document, and a product that holds
    every label is never corrupted.
    """
    n_labels = int(own.max()) + 1
    eligible = np.ones(len(true), dtype=bool)
    eligible[np.unique(doc_product * n_labels + true, return_index=True)[1]] = False
    eligible &= (own >= 0).sum(axis=1)[doc_product] < n_labels
    pool = np.flatnonzero(eligible)
    chosen = np.sort(rng.choice(pool, min(round(noise * len(true)), len(pool)), replace=False))
    mine = own[doc_product[chosen]]
    new = rng.integers(n_labels, size=len(chosen))
    while (bad := (new[:, None] == mine).any(axis=1)).any():
        new[bad] = rng.integers(n_labels, size=int(bad.sum()))
    labels = true.copy()
    labels[chosen] = new
    return labels


def _query_split(
    rng: np.random.Generator, config: SynthConfig, canonical: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Products of the queries (shuffled) and whether each is held out for evaluation."""
    query_product = rng.permutation(np.repeat(np.arange(config.classes), config.queries_per_class))
    if config.split == "class":
        labels = np.unique(canonical)
        held = rng.permutation(labels)[: round(config.eval_fraction * len(labels))]
        return query_product, np.isin(canonical[query_product], held)
    held = np.zeros(len(query_product), dtype=bool)
    held[rng.permutation(len(query_product))[: round(config.eval_fraction * len(held))]] = True
    return query_product, held


def _label_names(numbers: np.ndarray) -> list[str]:
    """The labels' names: ``c`` and label k's number ``numbers[k]``, zero-padded to at least
    five digits."""
    width = max(5, len(str(len(numbers) - 1)))
    return [f"c{k:0{width}d}" for k in numbers.tolist()]


def _plan(config: SynthConfig) -> _Plan:
    """Decide products, class sizes, labels, noise and the query split from the seed."""
    rng = _rng(config.seed, _PLAN)
    products = _sample_products(rng, config.classes)
    sizes = zipf_sizes(config.docs, config.classes, config.zipf)
    doc_product = rng.permutation(np.repeat(np.arange(config.classes), sizes))
    docs_of = _docs_of(doc_product, sizes)
    aliased, pairs = _pick_governance(rng, products, sizes, config)
    canonical, alias, n_labels = _label_slots(config.classes, aliased, pairs)
    doc_true = canonical[doc_product]
    _split_aliases(rng, docs_of, alias, doc_true)
    own = np.stack([canonical, alias], axis=1)
    doc_label = _corrupt(rng, doc_product, doc_true, own, config.noise)
    label_numbers = rng.permutation(n_labels)  # drawn before the queries
    query_product, query_eval = _query_split(rng, config, canonical)
    return _Plan(
        products=products,
        sizes=sizes,
        price_factor=rng.uniform(0.7, 1.6, config.classes),
        doc_product=doc_product,
        doc_true=doc_true,
        doc_label=doc_label,
        label_names=_label_names(label_numbers),
        canonical=canonical,
        alias=alias,
        broad_pairs=pairs,
        query_product=query_product,
        query_eval=query_eval,
    )


# ---------------------------------------------------------------------------------------------
# Drawing a product


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a size x size canvas, shared read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at a pixel size (no font files needed)."""
    return ImageFont.load_default(size=size)


def _shaded(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """colour times factor, clipped to 0..255."""
    return tuple(min(255, max(0, round(c * factor))) for c in colour)


def _pattern_weight(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Weight of the second colour at body-relative (u, v): the pattern, in [0, 1]."""
    if pattern == "striped":
        return np.floor(v * 7) % 2
    if pattern == "dotted":
        return ((u * 4 % 1 - 0.5) ** 2 + (v * 4 % 1 - 0.5) ** 2 < 0.09).astype(np.float32)
    if pattern == "checked":
        return (np.floor(u * 4) + np.floor(v * 4)) % 2
    if pattern == "gradient":
        return np.clip(v, 0.0, 1.0)
    if pattern == "diagonal":
        return np.floor((u + v) * 4) % 2
    if pattern == "chevron":
        return np.floor(v * 5 + 2 * np.abs(u * 2.5 % 1 - 0.5)) % 2
    return np.zeros_like(u)


def _window(box: tuple, size: int) -> tuple[int, int, int, int]:
    """The pixel rectangle covering box, clipped to the canvas."""
    x0, y0, x1, y1 = (min(size, max(0, round(c))) for c in box)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _pattern(pattern: str, box: tuple, window: tuple, main: tuple, second: tuple) -> Image.Image:
    """The pattern over window, anchored to the body box so that it moves with the item."""
    x0, y0, x1, y1 = box
    u = ((np.arange(window[0], window[2], dtype=np.float32) + 0.5 - x0) / (x1 - x0))[None, :]
    v = ((np.arange(window[1], window[3], dtype=np.float32) + 0.5 - y0) / (y1 - y0))[:, None]
    t = np.broadcast_to(_pattern_weight(pattern, u, v), (v.size, u.size))[..., None]
    low = np.asarray(main, np.float32)
    rgb = low + t * (np.asarray(second, np.float32) - low)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, **style) -> None:
    """Draw the body silhouette (filled or outlined, per style) in box."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "round":
        draw.ellipse(box, **style)
    elif shape == "square":
        draw.rectangle(box, **style)
    elif shape == "hexagonal":
        cy = (y0 + y1) / 2
        hexagon = [(x0 + w / 4, y0), (x1 - w / 4, y0), (x1, cy), (x1 - w / 4, y1)]
        draw.polygon([*hexagon, (x0 + w / 4, y1), (x0, cy)], **style)
    else:  # rounded, tall
        draw.rounded_rectangle(box, radius=0.22 * min(w, h), **style)


def _draw_parts(
    draw: ImageDraw.ImageDraw,
    parts: Iterable[_Part],
    to_px: Callable[[float, float], tuple[float, float]],
    colour: tuple,
    width: int,
) -> None:
    """Draw parts whose coordinates to_px maps to pixels; rings are outlines of width."""
    for prim, coords, _front in parts:
        points = [to_px(u, v) for u, v in zip(coords[0::2], coords[1::2], strict=True)]
        if prim == "poly":
            draw.polygon(points, fill=colour)
        elif prim == "rect":
            draw.rectangle(points, fill=colour)
        elif prim == "oval":
            draw.ellipse(points, fill=colour)
        else:
            draw.ellipse(points, outline=colour, width=width)


def _relative(box: tuple, u: float, v: float) -> tuple[float, float]:
    """Body-relative (u, v) to pixels."""
    return box[0] + u * (box[2] - box[0]), box[1] + v * (box[3] - box[1])


def _body_box(kind: _Kind, shape: str, size: int, place: tuple[float, float, float]) -> tuple:
    """The body box in pixels, placed by (scale, dx, dy) in canvas units; tall narrows it."""
    x0, y0, x1, y1 = kind.body
    if shape == "tall":
        centre, half = (x0 + x1) / 2, (x1 - x0) * 0.34
        x0, x1 = centre - half, centre + half
    scale, dx, dy = place
    return tuple(
        size * (0.5 + scale * (c - 0.5) + shift)
        for c, shift in ((x0, dx), (y0, dy), (x1, dx), (y1, dy))
    )


def _draw_badge(
    draw: ImageDraw.ImageDraw, mark: str, box: tuple, unit: float, shade: float
) -> None:
    """The printed mark: a letter, digit or glyph on a light badge at the body centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    r = min(0.3 * min(box[2] - box[0], box[3] - box[1]), 0.13 * unit)
    ink = _shaded(_INK, shade)
    draw.ellipse(
        (cx - r, cy - r, cx + r, cy + r),
        fill=_shaded(_BADGE, shade),
        outline=ink,
        width=max(1, round(r / 10)),
    )
    if mark in _GLYPH_PARTS:
        to_px = partial(_relative, (cx, cy, cx + r, cy + r))
        _draw_parts(draw, _GLYPH_PARTS[mark], to_px, ink, max(1, round(r * 0.22)))
    else:
        draw.text((cx, cy), mark, font=_font(max(6, round(1.3 * r))), fill=ink, anchor="mm")


def _draw_product(
    product: Product, size: int, place: tuple[float, float, float], shade: float
) -> Image.Image:
    """The product alone on a transparent size x size RGBA canvas."""
    kind = KINDS[product.kind]
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    box = _body_box(kind, product.shape, size, place)
    trim = _shaded(COLOURS[product.colour], 0.55 * shade)
    line = max(1, round(size * place[0] / 48))
    to_px = partial(_relative, box)
    _draw_parts(draw, [p for p in kind.parts if not p.front], to_px, trim, 3 * line)
    main = _shaded(COLOURS[product.colour], shade)
    second = _shaded(COLOURS[product.secondary or product.colour], shade)
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), product.shape, box, fill=255)
    window = _window(box, size)
    pattern = _pattern(product.pattern, box, window, main, second)
    layer.paste(pattern, window[:2], mask.crop(window))
    _draw_shape(draw, product.shape, box, outline=trim, width=line)
    _draw_parts(draw, [p for p in kind.parts if p.front], to_px, trim, 3 * line)
    _draw_badge(draw, product.mark, box, size * place[0], shade)
    return layer


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    """Encoded image bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _doc_image(product: Product, rng: np.random.Generator, size: int) -> bytes:
    """A catalog shot: the product, slightly jittered, on a plain light background (PNG).

    Drawn at twice the size and box-downsampled, which anti-aliases the edges.
    """
    big = 2 * size
    place = (rng.uniform(0.9, 1.04), rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    layer = _draw_product(product, big, place, rng.uniform(0.9, 1.06))
    background = _LIGHT_BACKGROUNDS[rng.integers(len(_LIGHT_BACKGROUNDS))]
    canvas = Image.new("RGB", (big, big), background)
    canvas.paste(layer, (0, 0), layer)
    return _encode(canvas.resize((size, size), Image.Resampling.BOX), "PNG")


# ---------------------------------------------------------------------------------------------
# Query photos


def _colour(rng: np.random.Generator, low: int = 20, high: int = 236) -> tuple[int, int, int]:
    """A random RGB colour."""
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _surface(rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour of the things around a product (tables, walls, cloth): a random colour faded
    halfway or more towards a random grey, so that the product stays the loudest thing."""
    grey = rng.uniform(70, 220)
    colour = np.asarray(_colour(rng), np.float64)
    fade = rng.uniform(*_PHOTO["fade"])
    return tuple(int(round(c)) for c in grey + (1 - fade) * (colour - grey))


def _mix(t: np.ndarray, a: tuple, b: tuple) -> Image.Image:
    """Blend colours a and b with weights t (a square array in [0, 1]) as an RGB image."""
    mask = Image.fromarray(np.round(t * 255).astype(np.uint8), "L")
    return Image.composite(Image.new("RGB", mask.size, b), Image.new("RGB", mask.size, a), mask)


def _bg_clutter(rng: np.random.Generator, size: int) -> Image.Image:
    """A coloured surface with random boxes and discs lying around."""
    image = Image.new("RGB", (size, size), _surface(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x, y = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.1, 0.6, 2) * size
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=_surface(rng))
    return image


def _bg_blobs(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth blotchy texture: a few random pixels upsampled."""
    cells = int(rng.integers(2, 6))
    small = np.array([[_surface(rng) for _ in range(cells)] for _ in range(cells)], np.uint8)
    return Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BICUBIC)


def _bg_waves(rng: np.random.Generator, size: int) -> Image.Image:
    """Wood grain or a tablecloth: a sinusoid at a random angle between two colours."""
    yy, xx = _grid(size)
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(2, 12)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) / size * cycles + rng.uniform()
    return _mix(0.5 + 0.5 * np.sin(2 * np.pi * phase), _surface(rng), _surface(rng))


def _bg_gradient(rng: np.random.Generator, size: int) -> Image.Image:
    """A wall or a sky: a linear gradient at a random angle."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / size
    t = (t - t.min()) / (t.max() - t.min())
    return _mix(t, _surface(rng), _surface(rng))


_BACKGROUNDS = (_bg_clutter, _bg_blobs, _bg_waves, _bg_gradient)

# How far a user photo strays from the catalog shot: the product is framed as someone aims a
# phone at it (mostly centred, filling much of the frame, a little turned and tilted).
_PHOTO = {
    "scale": (0.75, 1.1),  # product size relative to the catalog shot
    "turn": 0.3,  # rotation, radians either way
    "shift": 0.1,  # centre offset, canvas units either way
    "tilt": 0.05,  # perspective corner jitter
    "fade": (0.45, 0.85),  # how grey the surroundings are
    "occlude": 0.2,  # chance of a finger or object over the product
    "cover": (0.06, 0.15),  # its half-size
    "blur_rate": 0.5,
    "blur": (0.2, 0.8),
    "contrast": (0.8, 1.15),
    "bright": 25.0,
    "cast": 0.1,
    "noise": 4.0,
    "jpeg": (60, 93),
}


def _perspective(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients that map output points dst onto input points src (4 x 2)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return tuple(float(c) for c in np.linalg.solve(np.array(rows), np.array(rhs)))


def _skew(layer: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Scale, rotate, move and perspective-skew the product layer (a hand-held shot)."""
    size = layer.width
    scale, angle = rng.uniform(*_PHOTO["scale"]), rng.uniform(-1, 1) * _PHOTO["turn"]
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = size * (0.5 + rng.uniform(-1, 1, 2) * _PHOTO["shift"])
    dst = centre + scale * (corners - size / 2) @ rotation.T
    dst += rng.uniform(-1, 1, (4, 2)) * _PHOTO["tilt"] * size * scale
    coefficients = _perspective(dst, corners)
    return layer.transform(
        layer.size, Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BILINEAR
    )


def _occlude(photo: Image.Image, rng: np.random.Generator) -> None:
    """Sometimes cover part of the middle with a finger or another object."""
    if rng.random() >= _PHOTO["occlude"]:
        return
    size = photo.width
    x, y = size * (0.5 + rng.uniform(-0.35, 0.35, 2))
    w, h = size * rng.uniform(*_PHOTO["cover"], 2)
    colour = _SKIN[rng.integers(len(_SKIN))] if rng.random() < 0.5 else _colour(rng)
    ImageDraw.Draw(photo).ellipse((x - w, y - h, x + w, y + h), fill=colour)


def _light(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lighting and sensor: contrast, brightness, a colour cast and a little noise."""
    rgb = np.asarray(photo, np.float32)
    contrast, bright = rng.uniform(*_PHOTO["contrast"]), rng.uniform(-1, 1) * _PHOTO["bright"]
    rgb = (rgb - 128) * contrast + 128 + bright
    noise = rng.standard_normal(rgb.shape, dtype=np.float32) * rng.uniform(0, _PHOTO["noise"])
    cast = 1 + rng.uniform(-1, 1, 3) * _PHOTO["cast"]
    rgb = rgb * cast.astype(np.float32) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _query_image(product: Product, rng: np.random.Generator, size: int) -> bytes:
    """A user photo of the product: clutter, skew, occlusion, blur, lighting, JPEG."""
    big = 2 * size
    photo = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))](rng, big)
    layer = _skew(_draw_product(product, big, (1.0, 0.0, 0.0), 1.0), rng)
    photo.paste(layer, (0, 0), layer)
    _occlude(photo, rng)
    photo = photo.resize((size, size), Image.Resampling.BOX)
    if rng.random() < _PHOTO["blur_rate"]:
        photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(*_PHOTO["blur"])))
    photo = _light(photo, rng)
    return _encode(photo, "JPEG", quality=int(rng.integers(*_PHOTO["jpeg"])))


# ---------------------------------------------------------------------------------------------
# Text


def _word(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    """The usual word (always when rng is None, else 60% of the time) or a variant."""
    if rng is None or rng.random() < 0.6:
        return options[0]
    return options[int(rng.integers(len(options)))]


def _title(product: Product, rng: np.random.Generator | None = None) -> str:
    """A catalog title naming every attribute; wording and order vary with rng."""
    words = partial(_word, rng=rng)
    colour = words(_COLOUR_WORDS.get(product.colour, (product.colour,)))
    if product.secondary is not None:
        second = words(_COLOUR_WORDS.get(product.secondary, (product.secondary,)))
        colour = (
            f"{colour} and {second}" if rng is None or rng.random() < 0.6 else f"{colour}/{second}"
        )
    marks = _GLYPH_MARKS if product.mark in _GLYPH_PARTS else _LETTER_MARKS
    fields = {
        "colour": colour,
        "pattern": words(_PATTERN_WORDS[product.pattern]),
        "shape": words(_SHAPE_WORDS[product.shape]),
        "noun": words(KINDS[product.kind].nouns),
        "mark": words(marks).format(product.mark),
    }
    title = words(_TITLES).format(**fields)
    return title[0].upper() + title[1:] if rng is not None and rng.random() < 0.5 else title


def _typed_query(product: Product, rng: np.random.Generator) -> str:
    """What a user types: the product noun plus one or two of colour, pattern and mark."""
    extras = ["colour", "mark"] + ([] if product.pattern == "solid" else ["pattern"])
    chosen = set(rng.choice(extras, size=int(rng.integers(1, 3)), replace=False).tolist())
    before = [product.colour] if "colour" in chosen else []
    before += [_PATTERN_WORDS[product.pattern][0]] if "pattern" in chosen else []
    after = [product.mark] if "mark" in chosen else []
    return " ".join([*before, KINDS[product.kind].nouns[0], *after]).lower()


# ---------------------------------------------------------------------------------------------
# Rows and files


def _doc_row(i: int, plan: _Plan, doc_id: str, config: SynthConfig) -> dict:
    """Document i: its own generator draws the text, the shot and the price."""
    rng = _rng(config.seed, _DOCS, i)
    p = int(plan.doc_product[i])
    product = plan.products[p]
    text = "" if rng.random() < config.empty_text_rate else _title(product, rng)
    price = KINDS[product.kind].price * plan.price_factor[p] * rng.uniform(0.92, 1.08)
    return {
        "doc_id": doc_id,
        "image": _doc_image(product, rng, config.image_size),
        "text": text,
        "category": KINDS[product.kind].category,
        "label": plan.label_names[plan.doc_label[i]],
        "price": round(float(price), 2),
    }


def _query_row(i: int, plan: _Plan, query_id: str, config: SynthConfig) -> dict:
    """Query i: a photo, a typed text or both, labelled with its product's canonical label."""
    rng = _rng(config.seed, _QUERIES, i)
    p = int(plan.query_product[i])
    product = plan.products[p]
    typed = rng.random() < config.text_query_rate
    text_only = typed and rng.random() < config.text_only_rate
    return {
        "query_id": query_id,
        "text": _typed_query(product, rng) if typed else None,
        "image": None if text_only else _query_image(product, rng, config.image_size),
        "label": plan.label_names[plan.canonical[p]],
    }


def _write_parquet(
    path: Path, schema: pa.Schema, rows: Iterator[dict], group: int, tick: Callable[[int], None]
) -> None:
    """Stream rows into path (published whole) in row groups of group rows."""
    sink = storage.ParquetSink(str(path), schema)
    while chunk := [row for _, row in zip(range(group), rows, strict=False)]:
        sink.write(pa.Table.from_pylist(chunk, schema=schema))
        tick(len(chunk))
    sink.close()


def _ticker(progress: Callable[[int], None] | None) -> Callable[[int], None]:
    """Turn per-chunk increments into cumulative progress(done) calls."""
    done = 0

    def tick(increment: int) -> None:
        nonlocal done
        done += increment
        if progress is not None:
            progress(done)

    return tick


# ---------------------------------------------------------------------------------------------
# Truth and entry point


def _truth_products(plan: _Plan, pids: list[str]) -> dict[str, dict]:
    """Per product: attributes, category, canonical title, labels and document count."""
    names, entries = plan.label_names, {}
    for p, product in enumerate(plan.products):
        labels = [names[plan.canonical[p]]] + ([names[plan.alias[p]]] if plan.alias[p] >= 0 else [])
        entries[pids[p]] = {
            **asdict(product),
            "category": KINDS[product.kind].category,
            "title": _title(product),
            "canonical_label": labels[0],
            "labels": labels,
            "documents": int(plan.sizes[p]),
        }
    return entries


def _counts(plan: _Plan) -> dict[str, int]:
    """Sizes of what was generated and injected."""
    return {
        "documents": len(plan.doc_product),
        "classes": len(plan.products),
        "labels": len(plan.label_names),
        "corrupted": int((plan.doc_label != plan.doc_true).sum()),
        "alias_groups": int((plan.alias >= 0).sum()),
        "broad_labels": len(plan.broad_pairs),
        "queries": int((~plan.query_eval).sum()),
        "eval_queries": int(plan.query_eval.sum()),
    }


def _truth(plan: _Plan, config: SynthConfig) -> dict:
    """What was injected, keyed by the ids in the parquet files (see ``generate``)."""
    names, doc_ids, query_ids = plan.label_names, plan.doc_ids, plan.query_ids
    pids = _ids("p", config.classes)
    docs_of = _docs_of(plan.doc_product, plan.sizes)
    corrupted = np.flatnonzero(plan.doc_label != plan.doc_true)
    aliased = np.flatnonzero(plan.alias >= 0)
    return {
        "config": asdict(config),
        "counts": _counts(plan),
        "corrupted": {doc_ids[i]: names[plan.doc_true[i]] for i in corrupted},
        "alias_groups": [
            {
                "product": pids[p],
                "canonical": names[plan.canonical[p]],
                "labels": [names[plan.canonical[p]], names[plan.alias[p]]],
            }
            for p in aliased
        ],
        "broad_labels": {
            names[plan.canonical[a]]: {pids[p]: [doc_ids[i] for i in docs_of[p]] for p in (a, b)}
            for a, b in plan.broad_pairs
        },
        "products": _truth_products(plan, pids),
        "doc_product": {d: pids[p] for d, p in zip(doc_ids, plan.doc_product, strict=True)},
        "query_product": {q: pids[p] for q, p in zip(query_ids, plan.query_product, strict=True)},
    }


def generate(
    out_dir: str | os.PathLike,
    config: SynthConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write catalog.parquet, queries.parquet, eval_queries.parquet and truth.json to out_dir.

    Each file is written under a temporary name and renamed; truth.json last. progress, if
    given, is called with the cumulative number of documents and queries written (out of
    ``config.total_items``). Returns {"paths": {key: path}, "counts": {...}}.

    truth.json holds: "config"; "counts"; "corrupted" (doc_id -> label before noise);
    "alias_groups" (list of {"product", "canonical", "labels"}: one product, two labels);
    "broad_labels" (label -> {product_id: [doc_id, ...]} for the two products it mixes);
    "products" (product_id -> attributes, category, title, canonical_label, labels,
    documents); "doc_product" and "query_product" (id -> product_id). Product ids exist only
    here: the catalog never shows them.
    """
    config = SynthConfig() if config is None else config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in FILES.items()}
    plan, tick, group = _plan(config), _ticker(progress), config.row_group_size
    docs = (_doc_row(i, plan, d, config) for i, d in enumerate(plan.doc_ids))
    _write_parquet(paths["catalog"], CATALOG_SCHEMA, docs, group, tick)
    query_ids = plan.query_ids
    for key, held in (("queries", False), ("eval_queries", True)):
        picked = np.flatnonzero(plan.query_eval == held).tolist()
        rows = (_query_row(i, plan, query_ids[i], config) for i in picked)
        _write_parquet(paths[key], QUERY_SCHEMA, rows, group, tick)
    truth = _truth(plan, config)
    storage.write_bytes(str(paths["truth"]), (json.dumps(truth, indent=1) + "\n").encode())
    return {"paths": {key: str(path) for key, path in paths.items()}, "counts": truth["counts"]}


def more_photos(
    path: str | os.PathLike, config: SynthConfig, products: list[str], per_product: int = 1
) -> dict[str, str]:
    """Write fresh query photos of the given products (ids of truth.json) to path: new draws
    (their own seed stream), in neither queries.parquet nor eval_queries.parquet, labelled
    like them; ids ``x000000``, ... With the training queries' products, they are held-out
    photos of classes seen in training. Returns {query_id: product_id}."""
    plan = _plan(config)
    index = {pid: p for p, pid in enumerate(_ids("p", config.classes))}
    unknown = sorted(set(products) - set(index))
    if unknown:
        raise ValueError(f"no such products in this catalog: {', '.join(unknown[:5])}")
    chosen = [pid for pid in products for _ in range(per_product)]
    picked = [index[pid] for pid in chosen]
    ids = _ids("x", len(picked))

    def rows() -> Iterator[dict]:
        for i, p in enumerate(picked):
            rng = _rng(config.seed, _MORE_PHOTOS, i)
            yield {
                "query_id": ids[i],
                "text": None,
                "image": _query_image(plan.products[p], rng, config.image_size),
                "label": plan.label_names[plan.canonical[p]],
            }

    _write_parquet(Path(path), QUERY_SCHEMA, rows(), config.row_group_size, _ticker(None))
    return dict(zip(ids, chosen, strict=True))
