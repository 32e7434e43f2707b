"""The person's side of governance: ``report.html`` shows every decision ``oclear govern``
proposes (merge, split, relabel, drop) under a stable id, with the thumbnails and titles of
the documents involved and the evidence; a review file names the decisions a person rejects,
and the next ``oclear govern --review FILE`` undoes them in the class map.

Review file (YAML or JSON)::

    reject: ["merge:L0b->L0", "relabel:d17"]   # undone in the class map
    accept: ["split:shoes"]                    # optional, recorded; stands anyway
"""

from __future__ import annotations

import base64
import html as _html
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

KINDS = ("merge", "split", "relabel", "drop")
SHOWN = 6  # documents shown per group of a decision (a label, a split part, a cluster)
PICTURED = 200  # decisions pictured per kind; the rest are listed with their evidence only
THUMB = 48  # thumbnail side in pixels


@dataclass(frozen=True, kw_only=True)
class Review:
    """A person's verdict by decision id: ``reject``ed decisions are undone, ``accept``ed ones
    are recorded; every decision the review does not reject stands."""

    accept: frozenset[str] = frozenset()
    reject: frozenset[str] = frozenset()

    def __post_init__(self):
        both = self.accept & self.reject
        if both:
            raise ValueError(f"review both accepts and rejects {', '.join(sorted(both))}")

    @classmethod
    def from_dict(cls, data) -> Review:
        """A review from a loaded file's mapping, its shape checked."""
        if not isinstance(data, dict):
            raise ValueError(f"a review is a mapping of 'reject' and 'accept' lists, got {data!r}")
        if set(data) - {"accept", "reject"}:
            raise ValueError(f"review keys are 'reject' and 'accept', got {sorted(data)}")
        lists = {}
        for key in ("accept", "reject"):
            ids = data.get(key) or []
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ValueError(f"review {key} must be a list of decision ids, got {ids!r}")
            lists[key] = frozenset(ids)
        return cls(**lists)

    def check(self, proposed) -> None:
        """Refuse ids that are not among the ``proposed`` decision ids (a typo, or a decision
        this run no longer makes)."""
        unknown = sorted((self.accept | self.reject) - set(proposed))
        if unknown:
            raise ValueError(f"review names decisions this run does not propose: {unknown}")

    def status(self, decision_id: str) -> str:
        if decision_id in self.reject:
            return "rejected"
        return "accepted" if decision_id in self.accept else "proposed"

    def record(self) -> dict:
        return {"accepted": sorted(self.accept), "rejected": sorted(self.reject)}


def load_review(path: str) -> Review:
    """A review file (local or URI), YAML or JSON; an empty file rejects nothing."""
    import yaml

    from oclear_ray import storage

    if not storage.exists(path):
        raise FileNotFoundError(f"no review file at {path}")
    try:
        data = yaml.safe_load(storage.read_bytes(path))
    except yaml.YAMLError as exc:
        raise ValueError(f"review file {path} is neither YAML nor JSON: {exc}") from exc
    return Review.from_dict({} if data is None else data)


# --------------------------------------------------------------------------- thumbnails


def thumbnail(data: bytes | None, size: int = THUMB) -> str | None:
    """A PNG data URI of the image fitted in ``size`` x ``size`` (``evaluate.thumbnail``; None
    without a readable image)."""
    from oclear_ray.evaluate import thumbnail as png_thumbnail

    png = png_thumbnail(data or None, size)
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def thumbnail_rows(batch: pa.Table, *, keep: list[str], size: int = THUMB) -> pa.Table:
    """``map_batches`` function: the rows whose ``doc_id`` is in ``keep``, as ``doc_id``,
    ``text``, ``label`` and ``thumb`` (a data URI): only those rows' images are decoded."""
    import pyarrow.compute as pc

    batch = batch.filter(pc.is_in(batch.column("doc_id"), value_set=pa.array(keep, pa.string())))
    thumbs = [thumbnail(b, size) for b in batch.column("image").to_pylist()]
    return pa.table(
        {
            "doc_id": batch.column("doc_id"),
            "text": batch.column("text"),
            "label": batch.column("label"),
            "thumb": pa.array(thumbs, pa.string()),
        }
    )


def pictured(decisions: list[dict], limit: int = PICTURED) -> set[str]:
    """Ids of the decisions pictured: the first ``limit`` of each kind."""
    seen = Counter()
    out = set()
    for d in decisions:
        seen[d["kind"]] += 1
        if seen[d["kind"]] <= limit:
            out.add(d["id"])
    return out


def pictured_docs(decisions: list[dict]) -> set[str]:
    """The doc ids report.html pictures (a few per pictured decision)."""
    shown = pictured(decisions)
    return {doc for d in decisions if d["id"] in shown for g in d["groups"] for doc in g["docs"]}


# --------------------------------------------------------------------------- report.html

_CSS = """body{font:14px system-ui,sans-serif;margin:2em;max-width:90em}
section{border-top:1px solid #ccc;padding:.4em 0}section.rejected{opacity:.6}
.status{font-size:80%;padding:0 .4em;border-radius:3px;background:#eee}
.rejected .status{background:#f4c4c4}.accepted .status{background:#c4f0c4}
h4{margin:.3em 0;font-weight:normal}pre{background:#f6f6f6;padding:.6em}
figure{display:inline-block;width:8em;margin:.2em;vertical-align:top;font-size:75%}
img{width:48px;height:48px;object-fit:contain;border:1px solid #ddd}"""

_HOW = """<h2>How to review</h2>
<p>Every decision below stands unless a review rejects it. Write a YAML (or JSON) file that
names the decisions to undo under <code>reject</code> (and, for the record, the ones checked
under <code>accept</code>), then run <code>oclear govern</code> again with the same inputs and
<code>--review FILE</code>. A rejected merge keeps the label as its own class, a rejected split
keeps the class whole, a rejected relabel or drop keeps the document's raw label. An id that
the run does not propose is an error.</p>
<pre>reject:
  - "merge:LABEL-&gt;INTO"
  - "relabel:DOC_ID"
accept:
  - "split:CLASS"
  - "drop:DOC_ID"</pre>"""


def html(decisions: list[dict], docs: dict[str, dict], class_map: dict, review: Review) -> str:
    """report.html: one static page (inline CSS and thumbnails, every text escaped) listing
    each decision with its id, status, evidence and the documents involved; ``docs``: doc_id
    -> ``text``, ``label``, ``thumb`` for the pictured documents."""
    shown = pictured(decisions)
    counts = Counter(d["kind"] for d in decisions)
    done = review.record()
    body = [
        f"<h1>Class governance review <code>{_esc(class_map['version'])}</code></h1>",
        f"<p>{len(class_map['labels'])} raw labels, {class_map['num_classes']} classes. "
        "Proposed: " + ", ".join(f"{k} {counts[k]}" for k in KINDS) + "; this run's review "
        f"rejected {len(done['rejected'])} and accepted {len(done['accepted'])}.</p>",
        _HOW,
        f"<p>At most {SHOWN} documents are shown per group (a label, a split part, a product "
        f"cluster), with the group's size; the first {PICTURED} decisions of each kind are "
        "pictured (relabels and drops least confident first), the rest listed with their "
        "evidence only.</p>",
    ]
    for kind in KINDS:
        items = [d for d in decisions if d["kind"] == kind]
        body.append(f"<h2>{kind.capitalize()}s ({len(items)})</h2>")
        body += [_decision(d, docs if d["id"] in shown else None, review) for d in items]
        if not items:
            body.append("<p>none</p>")
    title = f"Class governance review {_esc(class_map['version'])}"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _decision(d: dict, docs: dict | None, review: Review) -> str:
    status = review.status(d["id"])
    evidence = "; ".join(f"{k}: {v}" for k, v in d["evidence"].items())
    out = [
        f'<section class="{status}" id="{_esc(d["id"])}">',
        f'<h3><code>{_esc(d["id"])}</code> <span class="status">{status}</span></h3>',
        f"<p>{_esc(evidence)}</p>",
    ]
    if docs is None:
        out.append(f"<p><i>not pictured: beyond the first {PICTURED} of its kind</i></p>")
    else:
        for group in d["groups"]:
            figures = "".join(_figure(doc, docs.get(doc, {})) for doc in group["docs"])
            count = f"{len(group['docs'])} of {group['total']} shown"
            out.append(f"<h4>{_esc(group['caption'])} ({count})</h4><div>{figures}</div>")
    return "\n".join([*out, "</section>"])


def _figure(doc_id: str, row: dict) -> str:
    thumb = row.get("thumb")
    picture = f'<img src="{thumb}" alt="{_esc(doc_id)}">' if thumb else "<i>no image</i>"
    title = row.get("text") or ""
    title = title if len(title) <= 100 else title[:99] + "\u2026"
    caption = f"{_esc(title)}<br><small>{_esc(doc_id)} \u00b7 {_esc(row.get('label'))}</small>"
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def _esc(value) -> str:
    return _html.escape("" if value is None else str(value))
