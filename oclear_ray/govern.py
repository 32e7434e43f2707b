"""Category governance: organise the classes before learning by classification.

Raw catalog labels are skewed, noisy, and the category tree has near-duplicate (aliased) and
over-broad classes. ``govern`` turns them into a versioned class map that training consumes:

1. content features per document (Ray Data ``map_batches``): hashed word and character n-grams
   of the title (TF-IDF weighted), a small thumbnail and a colour histogram of the image, and
   optionally an exported model's document embedding;
2. *product clusters*: documents linked to their k nearest neighbours above a similarity
   threshold (FAISS k-NN, union-find); a cluster is one thing, whatever its labels say;
3. each cluster gets an owner label (majority vote; a tie goes to the label that has the
   cluster as its main place, then to the label with the larger share of its documents there);
4. **merge**: a label whose main cluster is owned by another label (or shared with another
   label that does not own it either), or whose home centre is nearly the same as another's,
   is an alias of it, when the titles of the two agree too (look-alike products cluster
   together: their titles tell them apart, e.g. by the printed mark);
   **split**: a class owning clusters that form two or more separate groups (by centre
   similarity), each with enough documents, covers several things and is split;
   **noise**: a document in a cluster owned by another class is relabelled to that class (the
   owner's vote share is the confidence), or dropped when the confidence is low;
5. **skew**: class sizes after governance, a long-tail report and per-class sampling weights
   (square-root or class-balanced, with a cap on huge classes) for the training pipeline.

The class map is JSON (``WORKDIR/govern/class_map.json``) with a content-hash ``version``;
``report.json`` and ``report.md`` explain it to a person, and ``report.html``
(``oclear_ray.review``) shows every proposed decision under a stable id
(``merge:<label>-><into>``, ``split:<class>``, ``relabel:<doc_id>``, ``drop:<doc_id>``) with
the documents involved. A review file that rejects some of them (``govern(review=...)``,
``oclear govern --review FILE``) has them undone in the class map, which records the review.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from oclear_ray.classmap import FORMAT, content_version
from oclear_ray.review import SHOWN, Review, pictured_docs, thumbnail_rows
from oclear_ray.review import html as review_page

POLICIES = ("none", "sqrt", "balanced")
_WORD = re.compile(r"[a-z0-9]+")
_NAME_TOKEN = re.compile(r"\w+|[^\w\s.,:;]")  # words and symbols (#, *, +) that can name a thing
_SENTENCE = re.compile(r"\.\s")  # a title names its thing first; keyword lists may follow
#: words that join a name's parts without naming anything ("mug *with* mark Q")
_STOP_WORDS = frozenset(
    ["a", "an", "and", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"]
)
#: the ranges of ``GovernConfig``'s numbers, (lowest, highest or None), and the fields in each:
#: counts, cosine similarities, block weights
_RANGES = {
    (1, None): (
        "text_dim",
        "thumb",
        "neighbours",
        "mutual",
        "min_split",
        "min_alias_docs",
        "min_support",
        "tail",
    ),
    (-1, 1): (
        "link",
        "mutual_link",
        "merge_similarity",
        "alias_similarity",
        "alias_text_similarity",
        "split_similarity",
        "min_confidence",
    ),
    (0, None): ("text_weight", "image_weight", "colour_weight", "model_weight"),
}


@dataclass(frozen=True, kw_only=True)
class GovernConfig:
    """Governance settings.

    text_dim: hashed text features; thumb: thumbnail side in pixels; text_weight, image_weight,
        colour_weight, model_weight: block weights of the combined feature (each block is
        L2-normalised first).
    neighbours: k of the k-NN graphs; link: cosine similarity that links two documents (and
        then two fragments' centres) into one product cluster; mutual, mutual_link: documents
        among each other's ``mutual`` nearest neighbours are linked from ``mutual_link`` on.
    merge_similarity: home centres at least this similar make two labels one class;
        alias_similarity: the least home-centre similarity of a label to the owner of its main
        cluster for it to be merged into that owner; alias_text_similarity: the least cosine
        of the two labels' title profiles (mean TF-IDF of their titles at home) for any merge:
        look-alike products share a picture, not the words naming them (a printed mark);
        min_alias_docs: documents a label needs in its main cluster to be merged by it.
    split_similarity: owned clusters whose centres are less similar than this are separate
        things; min_split: documents each part of a split needs.
    min_confidence: a noisy row whose new class has a lower vote share is dropped, not
        relabelled.
    min_support: documents of a row's own class that sit at home elsewhere for the row to
        count as noisy at all: looking like another class is no evidence on its own (a class's
        only document, or a look-alike of another class, keeps its label).
    policy: per-class sampling for training: "none" (the default: every document once an
        epoch; sqrt cost MAP@R on openmoji-dev, whose classes are real), "sqrt" (square-root
        of the class size) or "balanced" (every class alike); cap: most documents a class
        draws per epoch (None: no cap); tail: classes with at most this many documents count
        as the long tail.
    """

    text_dim: int = 2048
    thumb: int = 12
    text_weight: float = 1.0
    image_weight: float = 1.0
    colour_weight: float = 1.0
    model_weight: float = 1.0
    neighbours: int = 10
    link: float = 0.82
    mutual: int = 2
    mutual_link: float = 0.7
    merge_similarity: float = 0.95
    alias_similarity: float = 0.75
    alias_text_similarity: float = 0.7
    min_alias_docs: int = 2
    split_similarity: float = 0.8
    min_split: int = 2
    min_confidence: float = 0.5
    min_support: int = 2
    policy: str = "none"
    cap: int | None = None
    tail: int = 5

    def __post_init__(self):
        for (low, high), names in _RANGES.items():
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            for name in names:
                value = getattr(self, name)
                if not (low <= value and (high is None or value <= high)):
                    raise ValueError(f"govern {name} must be {bound}, got {value}")
        if self.policy not in POLICIES:
            raise ValueError(f"govern policy must be one of {POLICIES}, got {self.policy!r}")
        if self.cap is not None and self.cap < 1:
            raise ValueError(f"govern cap must be >= 1 or None, got {self.cap}")


# --------------------------------------------------------------------------- content features


def text_counts(texts, dim: int) -> np.ndarray:
    """Hashed counts of words (single letters and digits too: product marks) and of the
    character trigrams of each word, [N, dim] float32."""
    out = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        for word in _WORD.findall((text or "").lower()):
            out[row, zlib.crc32(b"w:" + word.encode()) % dim] += 1.0
            padded = f" {word} ".encode()
            for i in range(len(padded) - 2):
                out[row, zlib.crc32(b"c:" + padded[i : i + 3]) % dim] += 0.5
    return out


def tfidf(counts: np.ndarray) -> np.ndarray:
    """Sub-linear term frequency times smoothed inverse document frequency, rows L2-normalised."""
    df = (counts > 0).sum(0)
    idf = np.log((1 + len(counts)) / (1 + df)) + 1.0
    return l2_normalise(np.log1p(counts) * idf.astype(np.float32))


def image_descriptor(data: bytes | None, thumb: int) -> tuple[np.ndarray, np.ndarray]:
    """A centred ``thumb`` x ``thumb`` RGB thumbnail (layout) and a 64-bin colour histogram
    without the lightest bin (the plain background); zeros when there is no image."""
    import io

    from PIL import Image

    if not data:
        return np.zeros(3 * thumb * thumb, np.float32), np.zeros(64, np.float32)
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    small = np.asarray(rgb.resize((thumb, thumb), Image.Resampling.BOX), np.float32) / 255.0
    bins = np.asarray(rgb.resize((32, 32), Image.Resampling.BOX)).reshape(-1, 3) // 64
    hist = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64)
    hist = hist.astype(np.float32)
    hist[63] = 0.0
    return (small - small.mean()).reshape(-1), np.sqrt(hist)


class ContentFeatures:
    """``map_batches`` class: contract rows -> ``doc_id``, ``label``, hashed text counts,
    thumbnail and colour histogram (fixed-size float32 lists)."""

    def __init__(self, *, text_dim: int, thumb: int):
        self.text_dim, self.thumb = text_dim, thumb

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = text_counts(batch.column("text").to_pylist(), self.text_dim)
        images = [image_descriptor(b, self.thumb) for b in batch.column("image").to_pylist()]
        thumbs = np.stack([t for t, _ in images]) if images else np.zeros((0, 3 * self.thumb**2))
        colours = np.stack([c for _, c in images]) if images else np.zeros((0, 64))
        return pa.table(
            {
                "doc_id": batch.column("doc_id"),
                "label": batch.column("label"),
                "text": batch.column("text"),
                "text_counts": _fixed(texts),
                "thumb": _fixed(thumbs),
                "colour": _fixed(colours),
            }
        )


def _fixed(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def column_matrix(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size list column as a [N, D] float32 array."""
    column = table.column(name).combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def combine(blocks: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Concatenate L2-normalised feature blocks scaled by their weights, then L2-normalise."""
    parts = [l2_normalise(x) * w for x, w in blocks if w > 0]
    if not parts:
        raise ValueError("every feature weight is 0: nothing to compare documents by")
    return np.ascontiguousarray(l2_normalise(np.hstack(parts)))


def impute_missing(block: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Rows of ``block`` that are all zero (e.g. an empty title) take the row of their nearest
    neighbour by ``other`` that has one, so a missing modality does not look like a difference."""
    missing = ~block.any(1)
    if not missing.any() or missing.all():
        return block
    import faiss

    have = np.flatnonzero(~missing)
    xq, xb = (np.ascontiguousarray(other[m], np.float32) for m in (missing, have))
    _, nearest = faiss.knn(xq, xb, 1, metric=faiss.METRIC_INNER_PRODUCT)
    out = block.copy()
    out[missing] = block[have[nearest[:, 0]]]
    return out


# --------------------------------------------------------------------------- clusters


def knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-NN of every row among the others (FAISS): ``(S, I)`` [N, k], -1 padded."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    sims, ids = faiss.knn(x, x, min(k + 1, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
    keep = ids != np.arange(len(x))[:, None]
    out_s = np.full((len(x), k), -np.inf, np.float32)
    out_i = np.full((len(x), k), -1, np.int64)
    for row in range(len(x)):
        s, i = sims[row][keep[row]][:k], ids[row][keep[row]][:k]
        out_s[row, : len(s)], out_i[row, : len(i)] = s, i
    return out_s, out_i


def union_find(n: int, pairs) -> np.ndarray:
    """Connected components of ``n`` nodes under ``pairs``: component id per node, 0..C-1,
    numbered in order of each component's first node (scipy's csgraph)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64)
    edges = np.asarray(list(pairs), np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def components(sims: np.ndarray, ids: np.ndarray, link: float) -> np.ndarray:
    """Component id per row: the k-NN graph ``(sims, ids)`` cut at similarity ``link``."""
    rows, cols = np.nonzero((sims >= link) & (ids >= 0))
    return union_find(len(sims), zip(rows, ids[rows, cols], strict=True))


def mutual_pairs(sims: np.ndarray, ids: np.ndarray, top: int, link: float) -> list:
    """Pairs that are among each other's ``top`` nearest neighbours with similarity >= link."""
    near = {(i, int(j)) for i in range(len(ids)) for j in ids[i, :top] if j >= 0}
    return [
        (i, j)
        for i, j in near
        if i < j and (j, i) in near and sims[i, list(ids[i]).index(j)] >= link
    ]


def product_clusters(x: np.ndarray, cfg: GovernConfig) -> np.ndarray:
    """Cluster id per document, in two steps that resist single-link chaining: fragments
    (k-NN pairs at ``link``, or mutual nearest neighbours at ``mutual_link``), then fragments
    whose centres are ``link`` alike."""
    sims, ids = knn(x, cfg.neighbours)
    rows, cols = np.nonzero((sims >= cfg.link) & (ids >= 0))
    pairs = list(zip(rows, ids[rows, cols], strict=True))
    pairs += mutual_pairs(sims, ids, cfg.mutual, cfg.mutual_link)
    fragments = union_find(len(x), pairs)
    centre = centres(x, fragments, int(fragments.max()) + 1)
    return components(*knn(centre, cfg.neighbours), cfg.link)[fragments]


# --------------------------------------------------------------------------- owners


@dataclass
class Owners:
    """Who owns each cluster, and each label's main cluster."""

    owner: np.ndarray  # label index per cluster
    share: np.ndarray  # owner's vote share per cluster
    main: np.ndarray  # main cluster per label (-1: label has no documents)
    counts: dict  # (cluster, label) -> documents


def resolve_owners(
    clusters: np.ndarray, labels: np.ndarray, num_labels: int, noise: float = 0.1
) -> Owners:
    """Owner of each cluster and main cluster of each label.

    A label's main cluster is where its documents are least explained by label noise: the
    smallest Poisson tail probability of its count given ``noise * cluster size / labels``
    stray documents per label (ties: more documents). A cluster's owner has the most documents
    in it (ties: a label whose main cluster it is, then the label with the larger share of its
    own documents there).
    """
    counts = Counter(zip(clusters.tolist(), labels.tolist(), strict=True))
    sizes = np.bincount(clusters)
    label_sizes = np.bincount(labels, minlength=num_labels)
    stray = max(noise, 0.01) * sizes / max(1, num_labels - 1)
    main = np.full(num_labels, -1, np.int64)
    best: dict[int, tuple] = {}
    for (c, lab), n in counts.items():
        key = (-poisson_tail(n, stray[c]), n, -c)
        if lab not in best or key > best[lab]:
            best[lab], main[lab] = key, c
    owner = np.full(len(sizes), -1, np.int64)
    share = np.zeros(len(sizes))
    ranked: dict[int, tuple] = {}
    for (c, lab), n in counts.items():
        key = (n, main[lab] == c, n / label_sizes[lab], -lab)
        if c not in ranked or key > ranked[c]:
            ranked[c], owner[c], share[c] = key, lab, n / sizes[c]
    return Owners(owner=owner, share=share, main=main, counts=dict(counts))


def poisson_tail(n: int, lam: float) -> float:
    """log P(N >= n) for N ~ Poisson(lam): how unlikely n stray documents are."""
    from math import exp, lgamma, log

    terms = [exp(-lam + k * log(lam) - lgamma(k + 1)) for k in range(n)]
    return log(max(1.0 - sum(terms), 1e-300))


def noise_rate(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Share of documents outside their cluster's majority label (a first noise estimate)."""
    counts = Counter(zip(clusters.tolist(), labels.tolist(), strict=True))
    top: dict[int, int] = {}
    for (c, _), n in counts.items():
        top[c] = max(top.get(c, 0), n)
    return 1.0 - sum(top.values()) / max(1, len(labels))


def centres(x: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """L2-normalised mean feature of each group (-1 rows ignored; empty groups are zero)."""
    keep = groups >= 0
    out = np.zeros((num_groups, x.shape[1]), np.float32)
    np.add.at(out, groups[keep], x[keep])
    return l2_normalise(out)


# --------------------------------------------------------------------------- merges


def home_docs(clusters: np.ndarray, labels: np.ndarray, owners: Owners) -> np.ndarray:
    """Per document, its label when the document sits where its label is at home (a cluster
    the label owns, or the label's main cluster), else -1."""
    owned = owners.owner[clusters] == labels
    main = owners.main[labels] == clusters
    return np.where(owned | main, labels, -1)


def find_merges(
    x: np.ndarray,
    clusters: np.ndarray,
    labels: np.ndarray,
    owners: Owners,
    cfg: GovernConfig,
    text: np.ndarray | None = None,
    titles: list[str] | None = None,
) -> list[tuple[int, int, str, float]]:
    """Alias pairs ``(label, into, reason, similarity)``.

    "main cluster owned": the label's main cluster is owned by another label whose home centre
    is at least ``alias_similarity`` alike (its documents are a minority inside another
    label's thing). "same main cluster": two labels that both have their main cluster in one
    that neither owns (two names of a product that shares its cluster with a look-alike).
    A label needs ``min_alias_docs`` documents in its main cluster for either: one document is
    what a stray label looks like. "same centre": the two labels' home centres (mean of their
    documents at home) are at least ``merge_similarity`` alike. With ``text`` (per-document
    title vectors, zero rows for no title), every pair also needs title profiles at least
    ``alias_text_similarity`` alike: two products that differ only by a printed mark look
    alike and cluster together, but their titles name different marks. With ``titles`` (the
    raw texts), labels *named apart* are never merged: one uses a word in most of its titles
    that none of the other's titles has ("light skin tone" / "dark skin tone", two brand
    names), however alike the rest.
    """
    num_labels = len(owners.main)
    at_home = home_docs(clusters, labels, owners)
    home = centres(x, at_home, num_labels)
    alike = _named_alike(at_home, num_labels, cfg, text, titles)
    owned, guests = _owned_merges(home, owners, cfg, alike)
    merged = {a for a, *_ in owned}
    return [
        *owned,
        *_guest_merges(home, guests, merged, cfg, alike),
        *_centre_merges(home, cfg, alike),
    ]


def _named_alike(at_home: np.ndarray, num_labels: int, cfg: GovernConfig, text, titles):
    """``find_merges``' test of two labels' titles, ``alike(a, b)``: neither label is named
    apart from the other, and their title profiles are alike (without titles to compare, the
    picture decides)."""
    words = None if text is None else title_profiles(text, at_home, num_labels)
    name, used = name_words(titles, at_home, num_labels) if titles else (None, None)

    def alike(a: int, b: int) -> bool:
        if name is not None and (name[a] - used[b] or name[b] - used[a]):
            return False
        if words is None or not (words[a].any() and words[b].any()):
            return True
        return float(words[a] @ words[b]) >= cfg.alias_text_similarity

    return alike


def _owned_merges(home: np.ndarray, owners: Owners, cfg: GovernConfig, alike):
    """The "main cluster owned" pairs, and the guests: per cluster, the settled labels (with
    ``min_alias_docs`` documents in their main cluster) that have it as main but do not own
    it."""
    settled = [
        lab
        for lab, c in enumerate(owners.main.tolist())
        if c >= 0 and owners.counts.get((c, lab), 0) >= cfg.min_alias_docs
    ]
    pairs, guests = [], defaultdict(list)
    for lab in settled:
        c = int(owners.main[lab])
        into = int(owners.owner[c])
        if into == lab:
            continue
        guests[c].append(lab)
        similarity = float(home[lab] @ home[into])
        if similarity >= cfg.alias_similarity and alike(lab, into):
            pairs.append((lab, into, "main cluster owned", similarity))
    return pairs, guests


def _guest_merges(home: np.ndarray, guests: dict, merged: set, cfg: GovernConfig, alike):
    """The "same main cluster" pairs: two guests of one cluster, not both merged already."""
    pairs = []
    for group in guests.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if a in merged and b in merged:
                    continue
                similarity = float(home[a] @ home[b])
                if similarity >= cfg.alias_similarity and alike(a, b):
                    pairs.append((b, a, "same main cluster", similarity))
    return pairs


def _centre_merges(home: np.ndarray, cfg: GovernConfig, alike) -> list:
    """The "same centre" pairs: home centres at least ``merge_similarity`` alike."""
    sims = home @ home.T
    np.fill_diagonal(sims, -1.0)
    return [
        (int(b), int(a), "same centre", float(sims[a, b]))
        for a, b in zip(*np.nonzero(np.triu(sims >= cfg.merge_similarity)), strict=True)
        if alike(int(a), int(b))
    ]


def title_profiles(text: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group, the L2-normalised mean title vector of its members that have a title."""
    titled = np.where(text.any(1), groups, -1)
    return centres(text, titled, num_groups)


def title_tokens(title: str | None) -> set[str]:
    """The words and symbols of a title's first sentence (its name: what follows is often a
    list of keywords shared with related things), each with its occurrence number ("boy#2":
    the second "boy"), so that "man, man, boy" and "man, man, boy, boy" read apart; joining
    words (``_STOP_WORDS``) are left out."""
    seen = Counter()
    out = set()
    name = _SENTENCE.split(title or "", maxsplit=1)[0]
    for token in _NAME_TOKEN.findall(name.lower()):
        if token in _STOP_WORDS:
            continue
        seen[token] += 1
        out.add(f"{token}#{seen[token]}")
    return out


def name_words(
    titles: list[str], groups: np.ndarray, num_groups: int, share: float = 1.0
) -> tuple[list[set], list[set]]:
    """Per group, its name (the title tokens at least ``share`` of its titled members use) and
    every token its members use; groups -1 are ignored."""
    counts = [Counter() for _ in range(num_groups)]
    titled = np.zeros(num_groups)
    for title, group in zip(titles, groups.tolist(), strict=True):
        found = title_tokens(title)
        if group >= 0 and found:
            titled[group] += 1
            counts[group].update(found)
    names = [{w for w, n in c.items() if n >= share * titled[g]} for g, c in enumerate(counts)]
    return names, [set(c) for c in counts]


def merge_labels(num_labels: int, pairs) -> np.ndarray:
    """Class index per label after merging the pairs (connected components, 0..K-1)."""
    return union_find(num_labels, [(a, b) for a, b, *_ in pairs])


# --------------------------------------------------------------------------- splits


def find_splits(
    x: np.ndarray, clusters: np.ndarray, classes: np.ndarray, owners: Owners, cfg: GovernConfig
) -> dict[int, list[list[int]]]:
    """Over-broad classes: class -> groups of the clusters it owns (two or more groups).

    The owned clusters with at least ``min_split`` of the class's documents are grouped by
    centre similarity (``split_similarity``; fragments of one thing are alike); a class is
    split when two or more groups each hold ``min_split`` documents. Small owned clusters join
    the group of their nearest centre.
    """
    cluster_centres = centres(x, clusters, len(owners.owner))
    owned_by: dict[int, list[int]] = defaultdict(list)
    for c, k in enumerate(owners.owner):
        if k >= 0:
            owned_by[int(k)].append(c)
    out = {}
    for k, owned in owned_by.items():
        n = np.array([owners.counts.get((c, k), 0) for c in owned])
        big = [c for c, m in zip(owned, n, strict=True) if m >= cfg.min_split]
        if len(big) < 2:
            continue
        sims = cluster_centres[big] @ cluster_centres[big].T
        rows, cols = np.nonzero(np.triu(sims >= cfg.split_similarity, 1))
        group_of = union_find(len(big), zip(rows, cols, strict=True))
        if group_of.max() < 1:
            continue
        groups = [
            [big[i] for i in np.flatnonzero(group_of == g)] for g in range(group_of.max() + 1)
        ]
        for c in set(owned) - set(big):
            nearest = int(np.argmax(cluster_centres[big] @ cluster_centres[c]))
            groups[group_of[nearest]].append(c)
        out[k] = sorted(groups, key=lambda g: -sum(owners.counts.get((c, k), 0) for c in g))
    return out


# --------------------------------------------------------------------------- noise and the map


def cluster_classes(
    owners: Owners, splits: dict[int, list[list[int]]], num_classes: int
) -> tuple[np.ndarray, list]:
    """Final class per cluster (its owner, or the owner's split part) and the parts made:
    ``[(class, part number)]`` indexed by final class id (part 0 keeps the class's place)."""
    parts = [(k, 0) for k in range(num_classes)]
    final = owners.owner.copy()
    for k, groups in sorted(splits.items()):
        for number, group in enumerate(groups):
            if number:
                parts.append((k, number))
            final[group] = k if number == 0 else len(parts) - 1
    return final, parts


@dataclass
class Decision:
    """Governance outcome per document (arrays of length N)."""

    final: np.ndarray  # final class id (-1: dropped)
    noisy: np.ndarray  # bool: the label disagrees with the content
    confidence: np.ndarray  # vote share of the class the document ends in
    cluster: np.ndarray


def decide_rows(
    clusters: np.ndarray,
    classes: np.ndarray,
    owners: Owners,
    final: np.ndarray,
    cfg,
    text: np.ndarray | None = None,
    titles: list[str] | None = None,
) -> Decision:
    """Each document goes to its cluster's final class when it belongs there, else keeps its
    own class. It is noisy only with evidence beyond sitting in another class's cluster: at
    least ``min_support`` documents of its own class at home elsewhere (its class is a thing
    it does not look like), and, when it has a title, a title that names the cluster's owner
    and not its own class (``titles``: it has a token of the owner's name that none of its
    class's titles at home has, and none of its class's name that the owner's titles lack) and
    sits closer to the owner's titles than to its own class's (``text``). A noisy row is relabelled
    to the cluster's class, or dropped when that owner's vote share is below
    ``min_confidence``."""
    num = len(owners.main)
    at_home = home_docs(clusters, classes, owners)
    here = Counter(zip(at_home.tolist(), clusters.tolist(), strict=True))
    total = np.bincount(at_home[at_home >= 0], minlength=num)
    support = total[classes] - np.array(
        [here.get((k, c), 0) for k, c in zip(classes.tolist(), clusters.tolist(), strict=True)]
    )
    owner = owners.owner[clusters]
    noisy = (owner != classes) & (support >= cfg.min_support)
    if text is not None:
        profiles = title_profiles(text, at_home, num)
        own, other = (text * profiles[classes]).sum(1), (text * profiles[owner]).sum(1)
        noisy &= ~text.any(1) | (other > own)
    if titles is not None:
        name, used = name_words(titles, at_home, num, share=0.75)  # names that tolerate synonyms
        for i in np.flatnonzero(noisy):
            tokens, own, new = title_tokens(titles[i]), classes[i], owner[i]
            names_new = (name[new] & tokens) - used[own]
            names_own = (name[own] & tokens) - used[new]
            noisy[i] = not tokens or bool(names_new and not names_own)
    confidence = owners.share[clusters]
    target = np.where(owner == classes, final[clusters], classes)
    target[noisy] = final[clusters][noisy]
    target[noisy & (confidence < cfg.min_confidence)] = -1
    return Decision(final=target, noisy=noisy, confidence=confidence, cluster=clusters)


def organise(
    x: np.ndarray,
    labels: list[str],
    cfg: GovernConfig,
    text: np.ndarray | None = None,
    titles: list[str] | None = None,
) -> dict:
    """Features and raw labels of N documents -> the governance decisions (no Ray). ``text``:
    the documents' title vectors (``text_features``) and ``titles`` their raw texts, which
    merges and relabels must agree with.

    Returns ``label_names``, per-label ``label_class`` (after merges), ``merges``, ``splits``,
    ``parts`` and the per-document ``Decision``.
    """
    names, y = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    clusters = product_clusters(x, cfg)
    noise = noise_rate(clusters, y)
    owners = resolve_owners(clusters, y, len(names), noise)
    merges = find_merges(x, clusters, y, owners, cfg, text, titles)
    label_class = merge_labels(len(names), merges)
    classes = label_class[y]
    owners = resolve_owners(clusters, classes, int(label_class.max()) + 1, noise)
    splits = find_splits(x, clusters, classes, owners, cfg)
    final, parts = cluster_classes(owners, splits, int(label_class.max()) + 1)
    decision = decide_rows(clusters, classes, owners, final, cfg, text, titles)
    return {
        "label_names": [str(n) for n in names],
        "label_class": label_class,
        "merges": merges,
        "splits": splits,
        "parts": parts,
        "decision": decision,
    }


# --------------------------------------------------------------------------- skew


def sampling_weights(sizes: np.ndarray, policy: str, cap: int | None = None) -> np.ndarray:
    """Expected draws per document per epoch for each class, so that an epoch keeps the
    catalog's size: ``none`` (1 each), ``sqrt`` (class draws ~ sqrt(size)), ``balanced``
    (every class alike); ``cap`` bounds a class's expected draws."""
    sizes = np.asarray(sizes, np.float64)
    target = {"none": sizes, "sqrt": np.sqrt(sizes), "balanced": np.sign(sizes)}[policy]
    target = target * sizes.sum() / max(target.sum(), 1e-12)
    if cap is not None:
        target = np.minimum(target, cap)
    return np.where(sizes > 0, target / np.maximum(sizes, 1), 0.0)


def skew_report(sizes: np.ndarray, tail: int) -> dict:
    """Class-size statistics and the long tail: how much of the catalog the biggest classes
    hold, how many classes are tiny."""
    s = np.sort(np.asarray(sizes))[::-1]
    total = max(int(s.sum()), 1)
    top = max(1, len(s) // 10)
    return {
        "classes": len(s),
        "documents": int(s.sum()),
        "largest": int(s[0]) if len(s) else 0,
        "median": float(np.median(s)) if len(s) else 0.0,
        "smallest": int(s[-1]) if len(s) else 0,
        "top_10pct_share": float(s[:top].sum() / total),
        "tail_threshold": tail,
        "tail_classes": int((s <= tail).sum()),
        "tail_share": float(s[s <= tail].sum() / total),
        "imbalance": float(s[0] / max(s[-1], 1)) if len(s) else 0.0,
    }


# --------------------------------------------------------------------------- the class map


def build_class_map(
    doc_ids: list[str],
    labels: list[str],
    out: dict,
    cfg: GovernConfig,
    review: Review | None = None,
) -> dict:
    """The versioned class map from ``organise``'s decisions (see the module docstring), less
    those ``review`` rejects (ids from ``decisions``; unknown ids are an error): a rejected
    merge keeps its two labels in separate classes (``merge_apart``), a rejected split keeps
    its class whole, a rejected relabel or drop leaves the row with its raw label's class.
    The decisions are not made again, so every other one stands as proposed;
    class ids are renumbered 0..num_classes-1 over what remains, and the map records the
    review (so its version changes)."""
    review = review or Review()
    proposed = decisions(doc_ids, labels, out, cfg)
    review.check(d["id"] for d in proposed)
    undo = defaultdict(set)
    for d in proposed:
        if d["id"] in review.reject:
            undo[d["kind"]].add(d["key"])
    names = out["label_names"]
    label_class, pairs = merge_apart(len(names), out["merges"], undo["merge"])
    dest, number = _row_places(labels, out, undo)
    row_class, parts = _renumber(label_class, dest, number)
    part_name = _part_names(names, label_class, parts)
    sizes = np.bincount(row_class[row_class >= 0], minlength=len(parts))
    weights = sampling_weights(sizes, cfg.policy, cfg.cap)
    label_of = {name: int(label_class[i]) for i, name in enumerate(names)}
    body = {
        "format": FORMAT,
        "num_classes": len(parts),
        "classes": [
            {"id": k, "name": part_name[k], "size": int(sizes[k]), "weight": float(weights[k])}
            for k in range(len(parts))
        ],
        "labels": label_of,
        "merges": _merge_records(names, label_class, pairs),
        "splits": _split_records(part_name, parts),
        **_row_moves(doc_ids, labels, row_class, label_of, out["decision"]),
        "sampling": {"policy": cfg.policy, "cap": cfg.cap},
        "review": review.record(),
        "config": asdict(cfg),
    }
    return {"version": content_version(body), **body}


def _split_records(part_name: list[str], parts: list) -> list[dict]:
    """Per class cut into parts (``parts``: ``(class, part rank)`` per final class id), its
    name and its parts' names."""
    split = Counter(k for k, _ in parts)
    return [
        {"class": part_name[k], "parts": [part_name[p] for p, (c, _) in enumerate(parts) if c == k]}
        for k in sorted(split)
        if split[k] > 1
    ]


def _row_moves(doc_ids, labels, row_class: np.ndarray, label_of: dict, decision: Decision) -> dict:
    """The rows a class map moves off their raw label's class: ``doc_class`` (their class),
    ``relabelled`` (those with a noisy label: from, to, confidence) and ``dropped`` (noisy rows
    with no confident class)."""
    doc_class, relabelled, dropped = {}, {}, {}
    for i, doc in enumerate(doc_ids):
        target, own = int(row_class[i]), label_of[labels[i]]
        confidence = round(float(decision.confidence[i]), 4)
        if target < 0:
            dropped[doc] = {
                "label": labels[i],
                "reason": "noisy label, no confident class",
                "confidence": confidence,
            }
        elif target != own:
            doc_class[doc] = target
            if decision.noisy[i]:
                relabelled[doc] = {"from": labels[i], "to": target, "confidence": confidence}
    return {"doc_class": doc_class, "relabelled": relabelled, "dropped": dropped}


def merge_apart(num_labels: int, pairs, apart) -> tuple[np.ndarray, list]:
    """Class index per label after merging the pairs (as ``merge_labels``) while every label
    pair in ``apart`` (a review's rejected merges) stays in two classes: links are applied
    strongest first, and one that would join an apart pair, directly or through other labels,
    is left out. Returns the classes and the links applied, in their given order."""
    partners = defaultdict(set)
    for a, b in map(tuple, apart):
        partners[a].add(b)
        partners[b].add(a)
    group, members = list(range(num_labels)), {i: [i] for i in range(num_labels)}
    applied = set()
    for n in sorted(range(len(pairs)), key=lambda n: -pairs[n][3]):
        keep, gone = sorted((group[pairs[n][0]], group[pairs[n][1]]))
        if keep != gone:
            if any(group[b] == gone for a in members[keep] for b in partners[a]):
                continue
            for m in members.pop(gone):
                group[m] = keep  # a group is named by its smallest label: merge_labels' order
                members[keep].append(m)
        applied.add(n)
    kept = [p for n, p in enumerate(pairs) if n in applied]
    return np.unique(group, return_inverse=True)[1], kept


def _row_places(labels: list[str], out: dict, undo: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the raw label (index) whose class it ends in (-1: dropped) and its split part
    number there: a relabelled row goes to the most common label of the rows that settle
    where it does (its product cluster's owner), a row whose relabel or drop is undone to its
    own label, part 0; rows of a class whose split is undone go to part 0."""
    decision, parts = out["decision"], out["parts"]
    index = {name: i for i, name in enumerate(out["label_names"])}
    own = np.array([index[label] for label in labels], np.int64)
    place = list(zip(decision.cluster.tolist(), decision.final.tolist(), strict=True))
    votes = Counter(
        (p, int(y)) for p, y, n in zip(place, own, decision.noisy, strict=True) if not n
    )
    owner = {}
    for (p, y), n in sorted(votes.items()):
        if p not in owner or n > votes[p, owner[p]]:
            owner[p] = y
    dest = np.where(decision.noisy, -1, own)
    number = np.zeros(len(labels), np.int64)
    for i, ((_, final), noisy) in enumerate(zip(place, decision.noisy, strict=True)):
        if final >= 0:
            dest[i] = owner[place[i]] if noisy else own[i]
            number[i] = 0 if parts[final][0] in undo["split"] else parts[final][1]
    reverted = sorted(undo["relabel"] | undo["drop"])
    dest[reverted], number[reverted] = own[reverted], 0
    return dest, number


def _renumber(
    label_class: np.ndarray, dest: np.ndarray, number: np.ndarray
) -> tuple[np.ndarray, list]:
    """Final class id per row (-1: dropped) and ``[(class, part rank)]`` per final id: class
    ``k`` keeps id ``k`` for its first part in use, further parts get ids from
    ``num_classes`` on (``cluster_classes``'s layout)."""
    kept = dest >= 0
    classes = np.where(kept, label_class[np.maximum(dest, 0)], -1)
    used = defaultdict(set)
    for k, n in zip(classes[kept].tolist(), number[kept].tolist(), strict=True):
        used[k].add(n)
    num = int(label_class.max()) + 1
    parts, part_of = [(k, 0) for k in range(num)], {}
    for k in range(num):
        for rank, n in enumerate(sorted(used[k])):
            if rank:
                parts.append((k, rank))
            part_of[k, n] = len(parts) - 1 if rank else k
    row_class = [part_of[k, n] if k >= 0 else -1 for k, n in zip(classes, number, strict=True)]
    return np.array(row_class, np.int64), parts


def _part_names(names: list[str], label_class: np.ndarray, parts: list) -> list[str]:
    """A class is named by its smallest raw label, its further split parts "<name>~2", ..."""
    first = {}
    for i, name in enumerate(names):
        first[int(label_class[i])] = min(first.get(int(label_class[i]), name), name)
    return [first[k] if n == 0 else f"{first[k]}~{n + 1}" for k, n in parts]


def decisions(
    doc_ids: list[str], labels: list[str], out: dict, cfg: GovernConfig, shown: int = SHOWN
) -> list[dict]:
    """Every change ``organise`` proposes, under an id a person can name in a review:
    ``merge:<label>-><into>`` (one per linked label pair, whatever its reasons),
    ``split:<class>``, ``relabel:<doc_id>`` and ``drop:<doc_id>`` (least confident first).

    Each has its ``kind``, ``evidence``, ``groups`` of the documents involved (a caption, at
    most ``shown`` doc ids, the group's size) and the ``key`` ``build_class_map`` undoes when
    it is rejected (the label pair, the class, the row)."""
    decision = out["decision"]
    part_name = _part_names(out["label_names"], out["label_class"], out["parts"])
    by_label, by_part, by_cluster = defaultdict(list), defaultdict(list), defaultdict(list)
    for i, doc in enumerate(doc_ids):
        by_label[labels[i]].append(doc)
        by_part[int(decision.final[i])].append(doc)
        if not decision.noisy[i]:
            by_cluster[int(decision.cluster[i])].append(doc)

    def group(caption: str, docs: list[str]) -> dict:
        return {"caption": caption, "docs": docs[:shown], "total": len(docs)}

    rows = _row_decisions(doc_ids, labels, decision, part_name, cfg)
    for d in rows:
        cluster = by_cluster[int(decision.cluster[d["key"]])]
        d["groups"] = [
            group("this document", [doc_ids[d["key"]]]),
            group("its product cluster", cluster),
        ]
    merges = _merge_decisions(out["label_names"], out["merges"])
    for d in merges:
        d["groups"] = [group(f"label {name}", by_label[name]) for name in d.pop("labels")]
    splits = []
    for k in sorted(out["splits"]):
        ids = [p for p, (c, _) in enumerate(out["parts"]) if c == k]
        reason = (
            f"its product clusters form {len(ids)} groups whose centres are less than "
            f"{cfg.split_similarity} alike"
        )
        splits.append(
            {
                "id": f"split:{part_name[k]}",
                "kind": "split",
                "key": k,
                "evidence": {"reason": reason},
                "groups": [group(f"part {part_name[p]}", by_part[p]) for p in ids],
            }
        )
    return sorted(merges, key=lambda d: d["id"]) + splits + rows


def _merge_decisions(names: list[str], pairs) -> list[dict]:
    """One merge decision per linked label pair, its reasons joined, its best similarity."""
    links = {}
    for a, b, reason, similarity in pairs:
        key = frozenset((a, b))
        if key in links:
            evidence = links[key]["evidence"]
            evidence["reason"] += f", {reason}"
            evidence["similarity"] = max(evidence["similarity"], round(similarity, 4))
            continue
        links[key] = {
            "id": f"merge:{names[a]}->{names[b]}",
            "kind": "merge",
            "key": key,
            "evidence": {"reason": reason, "similarity": round(similarity, 4)},
            "labels": [names[a], names[b]],
        }
    return list(links.values())


def _row_decisions(doc_ids, labels, decision: Decision, part_name, cfg) -> list[dict]:
    """Relabel then drop decisions, each kind least confident first."""
    out = {"relabel": [], "drop": []}
    for i in sorted(np.flatnonzero(decision.noisy), key=lambda i: decision.confidence[i]):
        target, confidence = int(decision.final[i]), round(float(decision.confidence[i]), 4)
        if target >= 0:
            kind, evidence = "relabel", {"from": labels[i], "to": part_name[target]}
            evidence["reason"] = "its content sits with another class"
        else:
            kind, evidence = "drop", {"label": labels[i]}
            evidence["reason"] = f"noisy label, no class with confidence >= {cfg.min_confidence}"
        evidence["confidence"] = confidence
        out[kind].append(
            {"id": f"{kind}:{doc_ids[i]}", "kind": kind, "key": int(i), "evidence": evidence}
        )
    return out["relabel"] + out["drop"]


def _merge_records(names, label_class, pairs) -> list[dict]:
    """One record per merged class: its labels and the evidence for each link."""
    groups = defaultdict(list)
    for i, name in enumerate(names):
        groups[int(label_class[i])].append(name)
    evidence = defaultdict(list)
    for a, b, reason, similarity in pairs:
        evidence[int(label_class[a])].append(
            {
                "label": names[a],
                "into": names[b],
                "reason": reason,
                "similarity": round(similarity, 4),
            }
        )
    return [
        {"class": k, "labels": sorted(groups[k]), "evidence": evidence[k]}
        for k in sorted(groups)
        if len(groups[k]) > 1
    ]


# --------------------------------------------------------------------------- the Ray job


def content_table(ds, cfg: GovernConfig) -> pa.Table:
    """Content features of the labelled documents, computed by Ray Data (fractional CPUs)."""
    import ray

    labelled = ds.filter(lambda row: bool(row["label"]))
    feats = labelled.map_batches(
        ContentFeatures,
        batch_format="pyarrow",
        batch_size=256,
        num_cpus=0.5,
        fn_constructor_kwargs={"text_dim": cfg.text_dim, "thumb": cfg.thumb},
        compute=_actors(),
    )
    tables = [t for t in ray.get(feats.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise ValueError("no labelled documents: governance needs a label column with values")
    return pa.concat_tables(tables)


def _actors():
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(min_size=1, max_size=2)


def model_vectors(ds, model_dir: str, doc_ids: list[str]) -> np.ndarray:
    """An exported model's document embeddings, in ``doc_ids`` order (Ray Data actors)."""
    import ray

    from oclear_ray.embed import EmbedConfig, embed_dataset, vectors_of

    config = EmbedConfig(batch_size=64, actors=1, cpus_per_actor=0.5, use_gpu=False)
    labelled = ds.filter(lambda row: bool(row["label"]))
    table = pa.concat_tables(ray.get(embed_dataset(labelled, model_dir, config).to_arrow_refs()))
    row_of = {d: i for i, d in enumerate(table.column("doc_id").to_pylist())}
    return vectors_of(table)[[row_of[d] for d in doc_ids]]


def text_features(table: pa.Table) -> np.ndarray:
    """TF-IDF title vectors, [N, text_dim]; zero rows for documents without a title."""
    return tfidf(column_matrix(table, "text_counts"))


def features(
    table: pa.Table,
    cfg: GovernConfig,
    model: np.ndarray | None = None,
    text: np.ndarray | None = None,
) -> np.ndarray:
    """The combined, L2-normalised document features (driver side: IDF needs every row);
    ``text``: the table's ``text_features`` when the caller already has them."""
    thumb, colour = column_matrix(table, "thumb"), column_matrix(table, "colour")
    image = combine([(thumb, 1.0), (colour, 1.0)])
    text = impute_missing(text_features(table) if text is None else text, image)
    blocks = [(text, cfg.text_weight), (thumb, cfg.image_weight), (colour, cfg.colour_weight)]
    if model is not None:
        blocks.append((model, cfg.model_weight))
    return combine(blocks)


@dataclass
class GovernResult:
    class_map_path: str
    version: str
    report: dict


def govern(
    catalog: str,
    workdir: str,
    *,
    config: GovernConfig | None = None,
    model_dir: str | None = None,
    queries: str | None = None,
    review: Review | None = None,
    progress=None,
) -> GovernResult:
    """Read the catalog's clean copy (``read.prepare``: checked once per input), compute
    features with Ray Data, organise the classes, undo what ``review`` rejects and write
    WORKDIR/govern/{report.json, report.md, report.html, class_map.json} (class map last)."""
    from oclear_ray import storage
    from oclear_ray.contract import CATALOG
    from oclear_ray.read import prepare

    cfg, review = config or GovernConfig(), review or Review()
    workdir = storage.absolute(workdir)  # Ray's workers do not run in this directory
    out_dir = storage.join(workdir, "govern")
    prepared = prepare(catalog, CATALOG, workdir, progress=progress)
    report, ds = prepared.report, prepared.dataset()
    table = content_table(ds, cfg).sort_by("doc_id")  # a rerun proposes the same decisions
    doc_ids, labels = table.column("doc_id").to_pylist(), table.column("label").to_pylist()
    model = model_vectors(ds, model_dir, doc_ids) if model_dir else None
    text = text_features(table)
    titles = table.column("text").to_pylist()
    decided = organise(features(table, cfg, model, text), labels, cfg, text=text, titles=titles)
    class_map = build_class_map(doc_ids, labels, decided, cfg, review)
    proposed = decisions(doc_ids, labels, decided, cfg)
    page = review_page(proposed, review_docs(ds, pictured_docs(proposed)), class_map, review)
    summary = governance_report(class_map, labels, cfg)
    summary["review"] = {"proposed": len(proposed), **class_map["review"]}
    summary["inputs"] = {
        "catalog": catalog,
        "model_dir": model_dir,
        "quarantined": report.quarantined,
    }
    if queries:
        summary["queries"] = query_coverage(queries, class_map)
    storage.write_bytes(
        storage.join(out_dir, "report.json"), json.dumps(summary, indent=1).encode()
    )
    storage.write_bytes(storage.join(out_dir, "report.md"), markdown(summary, class_map).encode())
    storage.write_bytes(storage.join(out_dir, "report.html"), page.encode())
    path = storage.join(out_dir, "class_map.json")
    storage.write_bytes(path, json.dumps(class_map, indent=1, sort_keys=True).encode())
    return GovernResult(path, class_map["version"], summary)


def review_docs(ds, wanted: set[str]) -> dict[str, dict]:
    """doc_id -> ``text``, ``label`` and a thumbnail (``thumb``, a data URI) of the ``wanted``
    documents, for report.html: the clean dataset filtered by doc_id with Ray Data, so only
    those few rows' images are decoded (one more read of the catalog, no second decode).
    ``ContentFeatures`` keeps no pictures: they would be held on the driver for every row."""
    if not wanted:
        return {}
    rows = ds.map_batches(
        thumbnail_rows, fn_kwargs={"keep": sorted(wanted)}, batch_format="pyarrow"
    ).take_all()
    return {row["doc_id"]: row for row in rows}


def query_coverage(queries: str, class_map: dict) -> dict:
    """How many query labels the class map knows (queries are never relabelled)."""
    import pyarrow.parquet as pq

    labels = [v for v in pq.read_table(queries, columns=["label"]).column("label").to_pylist() if v]
    known = sum(v in class_map["labels"] for v in labels)
    return {"labelled": len(labels), "known_labels": known}


def governance_report(class_map: dict, labels: list[str], cfg: GovernConfig) -> dict:
    """What governance found and did, for people (report.json)."""
    before = np.array(list(Counter(labels).values()))
    after = np.array([c["size"] for c in class_map["classes"]])
    ranked = sorted(class_map["classes"], key=lambda c: -c["size"])
    return {
        "version": class_map["version"],
        "labels": len(before),
        "classes": class_map["num_classes"],
        "skew_before": skew_report(before, cfg.tail),
        "skew_after": skew_report(after, cfg.tail),
        "sampling": {
            **class_map["sampling"],
            "largest_classes": [{k: c[k] for k in ("name", "size", "weight")} for c in ranked[:5]],
            "smallest_classes": [
                {k: c[k] for k in ("name", "size", "weight")} for c in ranked[-5:]
            ],
        },
        "merged_labels": sum(len(m["labels"]) - 1 for m in class_map["merges"]),
        "merges": class_map["merges"],
        "splits": class_map["splits"],
        "relabelled": len(class_map["relabelled"]),
        "dropped": len(class_map["dropped"]),
    }


def markdown(summary: dict, class_map: dict) -> str:
    """A short human summary of the governance report."""
    b, a = summary["skew_before"], summary["skew_after"]
    lines = [
        f"# Class governance ({summary['version']})",
        "",
        f"- {summary['labels']} raw labels -> {summary['classes']} classes "
        f"({summary['merged_labels']} labels merged, {len(summary['splits'])} classes split)",
        f"- {summary['relabelled']} documents relabelled, {summary['dropped']} dropped "
        "(noisy label, low confidence)",
        f"- skew: largest class {b['largest']} docs, median {b['median']:g}; the top 10 % of "
        f"classes hold {b['top_10pct_share']:.0%}; {b['tail_classes']} classes have <= "
        f"{b['tail_threshold']} docs",
        f"- after governance: largest {a['largest']}, median {a['median']:g}, "
        f"{a['tail_classes']} tail classes",
        f"- sampling: {class_map['sampling']['policy']}, cap {class_map['sampling']['cap']}",
        f"- review: {summary['review']['proposed']} decisions proposed (report.html), "
        f"{len(summary['review']['rejected'])} rejected, {len(summary['review']['accepted'])} "
        "accepted",
        "",
        "## Merges",
        "",
    ]
    lines += [f"- {', '.join(m['labels'])}" for m in summary["merges"]] or ["- none"]
    lines += ["", "## Splits", ""]
    lines += [f"- {s['class']} -> {', '.join(s['parts'])}" for s in summary["splits"]] or ["- none"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- scoring (synth)


def _precision_recall(predicted: set, true: set) -> dict:
    hit = len(predicted & true)
    return {
        "precision": hit / len(predicted) if predicted else 1.0,
        "recall": hit / len(true) if true else 1.0,
        "predicted": len(predicted),
        "true": len(true),
    }


def score_against_truth(class_map: dict, truth: dict) -> dict:
    """Noise, merge and split precision/recall of a class map against ``oclear synth``'s
    truth.json. Noise: flagged (relabelled or dropped) documents vs corrupted ones, plus the
    share of relabelled corrupted documents sent to their true label's class. Merge: label
    pairs put in one class vs alias pairs. Split: split labels vs broad labels."""
    flagged = set(class_map["relabelled"]) | set(class_map["dropped"])
    noise = _precision_recall(flagged, set(truth["corrupted"]))
    labels = class_map["labels"]
    fixed = [
        class_map["relabelled"][d]["to"] == labels.get(true_label)
        or class_map["classes"][class_map["relabelled"][d]["to"]]["name"].startswith(true_label)
        for d, true_label in truth["corrupted"].items()
        if d in class_map["relabelled"]
    ]
    noise["relabel_accuracy"] = float(np.mean(fixed)) if fixed else 0.0
    by_class = defaultdict(list)
    for label, k in labels.items():
        by_class[k].append(label)
    predicted = {tuple(sorted(p)) for g in by_class.values() for p in _pairs(g)}
    true = {tuple(sorted(p)) for g in truth["alias_groups"] for p in _pairs(g["labels"])}
    split = {
        labels_of
        for s in class_map["splits"]
        for labels_of in _split_labels(s, by_class, class_map)
    }
    return {
        "noise": noise,
        "merge": _precision_recall(predicted, true),
        "split": _precision_recall(split, set(truth["broad_labels"])),
    }


def _pairs(items) -> list[tuple]:
    items = sorted(items)
    return [(a, b) for i, a in enumerate(items) for b in items[i + 1 :]]


def _split_labels(split: dict, by_class: dict, class_map: dict) -> list[str]:
    """The raw labels of a split class."""
    ids = {c["name"]: c["id"] for c in class_map["classes"]}
    return by_class[ids[split["class"]]]
