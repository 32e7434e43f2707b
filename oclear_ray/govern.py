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
``report.json`` and ``report.md`` explain it to a person.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

FORMAT = "oclear-ray/class-map/v1"
POLICIES = ("none", "sqrt", "balanced")
_WORD = re.compile(r"[a-z0-9]+")
_NAME_TOKEN = re.compile(r"\w+|[^\w\s.,:;]")  # words and symbols (#, *, +) that can name a thing
_SENTENCE = re.compile(r"\.\s")  # a title names its thing first; keyword lists may follow


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
    policy: per-class sampling for training: "none", "sqrt" (square-root of the class size)
        or "balanced" (every class alike); cap: most documents a class draws per epoch
        (None: no cap); tail: classes with at most this many documents count as the long tail.
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
    policy: str = "sqrt"
    cap: int | None = None
    tail: int = 5

    def __post_init__(self):
        for name in (
            "text_dim",
            "thumb",
            "neighbours",
            "mutual",
            "min_split",
            "min_alias_docs",
            "min_support",
            "tail",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"govern {name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "link",
            "mutual_link",
            "merge_similarity",
            "alias_similarity",
            "alias_text_similarity",
            "split_similarity",
            "min_confidence",
        ):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"govern {name} must be in [-1, 1], got {getattr(self, name)}")
        for name in ("text_weight", "image_weight", "colour_weight", "model_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"govern {name} must be >= 0, got {getattr(self, name)}")
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
    index = faiss.IndexFlatIP(other.shape[1])
    index.add(np.ascontiguousarray(other[have]))
    _, nearest = index.search(np.ascontiguousarray(other[missing]), 1)
    out = block.copy()
    out[missing] = block[have[nearest[:, 0]]]
    return out


# --------------------------------------------------------------------------- clusters


def knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-NN of every row among the others (FAISS): ``(S, I)`` [N, k], -1 padded."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, min(k + 1, len(x)))
    keep = ids != np.arange(len(x))[:, None]
    out_s = np.full((len(x), k), -np.inf, np.float32)
    out_i = np.full((len(x), k), -1, np.int64)
    for row in range(len(x)):
        s, i = sims[row][keep[row]][:k], ids[row][keep[row]][:k]
        out_s[row, : len(s)], out_i[row, : len(i)] = s, i
    return out_s, out_i


def union_find(n: int, pairs) -> np.ndarray:
    """Connected components of ``n`` nodes under ``pairs``: component id per node, 0..C-1."""
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.unique([root(a) for a in range(n)], return_inverse=True)[1]


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
    words = None if text is None else title_profiles(text, at_home, num_labels)
    name, used = name_words(titles, at_home, num_labels) if titles else (None, None)

    def named_alike(a: int, b: int) -> bool:
        if name is not None and (name[a] - used[b] or name[b] - used[a]):
            return False
        if words is None or not (words[a].any() and words[b].any()):
            return True  # no titles to compare: the picture decides
        return float(words[a] @ words[b]) >= cfg.alias_text_similarity

    pairs = []
    settled = [
        lab
        for lab, c in enumerate(owners.main.tolist())
        if c >= 0 and owners.counts.get((c, lab), 0) >= cfg.min_alias_docs
    ]
    guests = defaultdict(list)  # cluster -> settled labels that have it as main but do not own it
    for lab in settled:
        c = int(owners.main[lab])
        into = int(owners.owner[c])
        if into == lab:
            continue
        guests[c].append(lab)
        similarity = float(home[lab] @ home[into])
        if similarity >= cfg.alias_similarity and named_alike(lab, into):
            pairs.append((lab, into, "main cluster owned", similarity))
    merged = {a for a, *_ in pairs}
    for group in guests.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if a in merged and b in merged:
                    continue
                similarity = float(home[a] @ home[b])
                if similarity >= cfg.alias_similarity and named_alike(a, b):
                    pairs.append((b, a, "same main cluster", similarity))
    sims = home @ home.T
    np.fill_diagonal(sims, -1.0)
    for a, b in zip(*np.nonzero(np.triu(sims >= cfg.merge_similarity)), strict=True):
        if named_alike(int(a), int(b)):
            pairs.append((int(b), int(a), "same centre", float(sims[a, b])))
    return pairs


def title_profiles(text: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group, the L2-normalised mean title vector of its members that have a title."""
    titled = np.where(text.any(1), groups, -1)
    return centres(text, titled, num_groups)


def title_tokens(title: str | None) -> set[str]:
    """The words and symbols of a title's first sentence (its name: what follows is often a
    list of keywords shared with related things), each with its occurrence number ("boy#2":
    the second "boy"), so that "man, man, boy" and "man, man, boy, boy" read apart."""
    seen = Counter()
    out = set()
    name = _SENTENCE.split(title or "", maxsplit=1)[0]
    for token in _NAME_TOKEN.findall(name.lower()):
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


def build_class_map(doc_ids: list[str], labels: list[str], out: dict, cfg: GovernConfig) -> dict:
    """The versioned class map from ``organise``'s decisions (see the module docstring)."""
    names, label_class, decision = out["label_names"], out["label_class"], out["decision"]
    parts = out["parts"]
    members = defaultdict(list)
    for i, name in enumerate(names):
        members[int(label_class[i])].append(name)
    part_name = [min(members[k]) if n == 0 else f"{min(members[k])}~{n + 1}" for k, n in parts]
    sizes = np.bincount(decision.final[decision.final >= 0], minlength=len(parts))
    weights = sampling_weights(sizes, cfg.policy, cfg.cap)
    label_of = {name: int(label_class[i]) for i, name in enumerate(names)}
    doc_class, relabelled, dropped = {}, {}, {}
    for i, doc in enumerate(doc_ids):
        target, own = int(decision.final[i]), label_of[labels[i]]
        confidence = round(float(decision.confidence[i]), 4)
        if target < 0:
            dropped[doc] = {
                "label": labels[i],
                "reason": "noisy label, no confident class",
                "confidence": confidence,
            }
        elif decision.noisy[i]:
            relabelled[doc] = {"from": labels[i], "to": target, "confidence": confidence}
            doc_class[doc] = target
        elif target != own:
            doc_class[doc] = target
    body = {
        "format": FORMAT,
        "num_classes": len(parts),
        "classes": [
            {"id": k, "name": part_name[k], "size": int(sizes[k]), "weight": float(weights[k])}
            for k in range(len(parts))
        ],
        "labels": label_of,
        "merges": _merge_records(names, label_class, out["merges"]),
        "splits": [
            {
                "class": part_name[k],
                "parts": [part_name[p] for p, (kk, _) in enumerate(parts) if kk == k],
            }
            for k in sorted(out["splits"])
        ],
        "doc_class": doc_class,
        "relabelled": relabelled,
        "dropped": dropped,
        "sampling": {"policy": cfg.policy, "cap": cfg.cap},
        "config": asdict(cfg),
    }
    return {"version": content_version(body), **body}


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


def content_version(body: dict) -> str:
    """First 16 hex digits of a sha256 over the canonical JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_class_map(source) -> dict:
    """A class map from a path (local or URI) or an already loaded dict, checked."""
    if isinstance(source, dict):
        data = source
    else:
        from oclear_ray import storage

        if not storage.exists(str(source)):
            raise FileNotFoundError(f"no class map at {source}")
        data = json.loads(storage.read_bytes(str(source)))
    if data.get("format") != FORMAT:
        raise ValueError(f"class map format {data.get('format')!r} is not {FORMAT!r}")
    body = {k: v for k, v in data.items() if k != "version"}
    if data.get("version") != content_version(body):
        raise ValueError("class map version does not match its content (edited or corrupt)")
    return data


def raw_class_map(labels) -> dict:
    """A class map with no governance: sorted raw labels, one class each, no sampling."""
    names = sorted(set(labels))
    body = {
        "format": FORMAT,
        "num_classes": len(names),
        "classes": [{"id": i, "name": n, "size": None, "weight": 1.0} for i, n in enumerate(names)],
        "labels": {n: i for i, n in enumerate(names)},
        "merges": [],
        "splits": [],
        "doc_class": {},
        "relabelled": {},
        "dropped": {},
        "sampling": {"policy": "none", "cap": None},
        "config": None,
    }
    return {"version": content_version(body), **body}


RAW_LABELS = "raw"


def find_class_map(class_map, workdir: str) -> dict | None:
    """The class map training uses: ``class_map`` (a path or a loaded map) when given, else
    WORKDIR/govern/class_map.json when it exists, else None (train on the raw labels);
    ``"raw"`` asks for the raw labels even when a governed map exists."""
    from oclear_ray import storage

    if class_map == RAW_LABELS:
        return None
    if class_map is not None:
        return load_class_map(class_map)
    found = storage.join(workdir, "govern", "class_map.json")
    return load_class_map(found) if storage.exists(found) else None


def apply_class_map(batch: pa.Table, *, class_map: dict) -> pa.Table:
    """``map_batches`` function: drop the dropped rows and rewrite ``label`` to the row's class
    id as a string (its own split or relabel decision, else its raw label's class); rows whose
    label the map does not know are dropped."""
    ids = batch.column("doc_id").to_pylist() if "doc_id" in batch.column_names else None
    labels, docs, dropped = class_map["labels"], class_map["doc_class"], class_map["dropped"]
    classes = []
    for i, label in enumerate(batch.column("label").to_pylist()):
        doc = ids[i] if ids else None
        classes.append(-1 if doc in dropped else docs.get(doc, labels.get(label, -1)))
    batch = batch.filter(pa.array([k >= 0 for k in classes], pa.bool_()))
    column = pa.array([str(k) for k in classes if k >= 0], pa.string())
    return batch.set_column(batch.column_names.index("label"), "label", column)


def class_weights(class_map: dict) -> np.ndarray | None:
    """Per-class sampling weights (expected draws per document per epoch), or None."""
    if class_map["sampling"]["policy"] == "none":
        return None
    return np.array([c["weight"] for c in class_map["classes"]], np.float64)


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
    progress=None,
) -> GovernResult:
    """Validate the catalog, compute features with Ray Data, organise the classes and write
    WORKDIR/govern/{class_map.json, report.json, report.md} (class map last)."""
    from oclear_ray import storage
    from oclear_ray.contract import CATALOG
    from oclear_ray.read import clean, read, validate

    cfg = config or GovernConfig()
    workdir = storage.absolute(workdir)  # Ray's workers do not run in this directory
    out_dir = storage.join(workdir, "govern")
    report = validate(
        read(catalog, CATALOG),
        CATALOG,
        storage.join(workdir, "quarantine", "govern.parquet"),
        progress=progress,
    )
    ds = clean(read(catalog, CATALOG), CATALOG, report)
    table = content_table(ds, cfg)
    doc_ids, labels = table.column("doc_id").to_pylist(), table.column("label").to_pylist()
    model = model_vectors(ds, model_dir, doc_ids) if model_dir else None
    text = text_features(table)
    titles = table.column("text").to_pylist()
    decided = organise(features(table, cfg, model, text), labels, cfg, text=text, titles=titles)
    class_map = build_class_map(doc_ids, labels, decided, cfg)
    summary = governance_report(class_map, labels, cfg)
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
    path = storage.join(out_dir, "class_map.json")
    storage.write_bytes(path, json.dumps(class_map, indent=1, sort_keys=True).encode())
    return GovernResult(path, class_map["version"], summary)


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
