"""Query-like views of documents (``ingest.render_view``, ``augment_docs``)."""

import numpy as np
from PIL import Image

from oclear_ray import ingest
from oclear_ray.ingest import augment_docs, render_view


def _glyph(size: int = 64) -> Image.Image:
    img = np.full((size, size, 3), 255, np.uint8)
    img[16:48, 20:44] = 0
    return Image.fromarray(img)


def test_every_rendering_keeps_the_size_and_the_paper_white(monkeypatch):
    rng = np.random.default_rng(0)
    for kind in ingest.RENDERINGS:
        monkeypatch.setattr(ingest, "RENDERINGS", {kind: 1.0})
        view = np.asarray(render_view(_glyph(), rng, strength=0.0))
        assert view.shape == (64, 64, 3), kind
        assert (view[0, 0] >= 250).all(), kind  # the corner is still paper


def test_duotone_and_badge_recolour_the_mark():
    rng = np.random.default_rng(1)
    mark = np.asarray(ingest._duotone(_glyph(), rng))
    inks = {tuple(p) for p in mark[16:48, 20:44].reshape(-1, 3)}
    assert (mark[0, 0] == 255).all() and len(inks) == 1  # paper stays, one ink for the mark
    assert inks != {(255, 255, 255)}
    badge = np.asarray(ingest._badge(_glyph(), rng))
    assert (badge[30, 30] == 255).all()  # the mark is knocked out in white
    assert (badge[0, 0] == 255).all()  # outside the tile stays paper


def test_render_views_train_the_query_tower_on_a_share_of_documents():
    batch = {
        "image": np.stack([np.asarray(_glyph())] * 40),
        "label": np.arange(40),
    }
    out = augment_docs(dict(batch), augment=False, doc_as_query_rate=0.5, view="render")
    use = out["has_query_image"]
    assert 5 < use.sum() < 35
    assert not out["query_image"][~use].any()  # no view where none was drawn
    assert all((out["query_image"][i] != batch["image"][i]).any() for i in np.flatnonzero(use))


def test_backdrop_replaces_the_plain_background_and_keeps_the_item():
    """The white around a drawn item becomes a coloured field; the item, the white enclosed by
    it included, stays; an image without a plain border is left as it is."""
    import torch

    img = np.full((64, 64, 3), 255, np.uint8)
    img[16:48, 16:48] = (200, 30, 30)  # a red box ...
    img[28:36, 28:36] = 255  # ... with a white mark inside
    torch.manual_seed(0)
    out = np.asarray(ingest.backdrop(Image.fromarray(img)))
    assert (out[16:48, 16:48] == img[16:48, 16:48]).all()
    assert not (out[:8, :8] == 255).all() and out.shape == img.shape
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert (np.asarray(ingest.backdrop(Image.fromarray(noisy))) == noisy).all()
