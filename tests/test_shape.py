"""The shape code beside the learned embedding (``model.ShapeCode``, ``model.shape``)."""

import numpy as np
import pytest
import torch

from oclear_ray.config import ModelConfig, ShapeConfig
from oclear_ray.model import RetrievalModel, ShapeCode, dct_basis
from oclear_ray.preprocess import PreprocessConfig, normalize


def _square(ink: tuple[int, int, int], size: int = 32) -> np.ndarray:
    img = np.full((size, size, 3), 255, np.uint8)
    img[8:20, 10:26] = ink
    return img


def test_the_dct_basis_is_orthonormal():
    basis = dct_basis(32, 8)
    assert basis.shape == (8, 32)
    assert torch.allclose(basis @ basis.T, torch.eye(8), atol=1e-5)


def test_a_mark_in_any_ink_has_the_shape_code_of_the_black_mark():
    pre = PreprocessConfig(image_size=32)
    code = ShapeCode(ShapeConfig(size=8), pre)
    images = normalize(np.stack([_square(ink) for ink in [(0, 0, 0), (200, 30, 30)]]), pre)
    moved = normalize(np.roll(_square((0, 0, 0)), 6, axis=1)[None], pre)
    black, red, elsewhere = code(torch.cat([images, moved]))
    assert black.shape == (63,)
    assert torch.linalg.norm(black).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(black, red, atol=1e-5)  # brightness and contrast do not count
    assert torch.dot(black, elsewhere).item() < 0.9  # where the ink is does


def test_ink_levels_read_a_colour_drawing_as_its_black_outline():
    pre = PreprocessConfig(image_size=32)
    outline = _square((255, 255, 255))
    outline[8:20, 10] = outline[8:20, 25] = outline[8, 10:26] = outline[19, 10:26] = 0
    filled = outline.copy()
    filled[9:19, 11:25] = (255, 200, 40)  # a yellow fill inside the black outline
    images = normalize(np.stack([outline, filled]), pre)
    ink = ShapeCode(ShapeConfig(size=8, levels="ink"), pre)(images)
    grey = ShapeCode(ShapeConfig(size=8, levels="grey"), pre)(images)
    assert torch.allclose(ink[0], ink[1], atol=1e-5)  # the fill reads as paper
    assert torch.dot(grey[0], grey[1]).item() < 0.999  # the fill's luma counts
    red = normalize(_square((200, 30, 30))[None], pre)  # a coloured mark is still ink
    assert ShapeCode(ShapeConfig(size=8, levels="ink"), pre)(red).abs().sum() > 0


def test_the_encoders_return_the_learned_part_and_the_weighted_shape_code():
    cfg = ModelConfig(
        shape=ShapeConfig(size=4, weight=2.0), preprocess=PreprocessConfig(image_size=32)
    )
    assert cfg.output_dim == 128 + 15
    model = RetrievalModel(cfg).eval()
    images = normalize(np.stack([_square((0, 0, 0)), _square((0, 90, 200))]), cfg.preprocess)
    with torch.no_grad():
        docs, queries = model.encode_doc(images), model.encode_query(images)
        text = model.encode_query(None, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    assert docs.shape == queries.shape == text.shape == (2, 143)
    assert torch.allclose(docs.norm(dim=1), torch.ones(2), atol=1e-5)
    # the shape part carries weight^2 / (1 + weight^2) of the squared norm
    assert (docs[:, 128:].norm(dim=1) ** 2).tolist() == pytest.approx([0.8, 0.8], abs=1e-5)
    assert torch.allclose(docs[0, 128:], docs[1, 128:], atol=1e-5)
    assert torch.count_nonzero(text[:, 128:]) == 0  # a typed query has no shape


def test_without_a_shape_code_the_embedding_is_the_learned_one():
    assert ModelConfig().output_dim == 128 + 575  # the CPU default: 24 x 24 frequencies
    assert ModelConfig(shape=ShapeConfig(size=0)).output_dim == 128
    assert ModelConfig(shape=ShapeConfig(size=8, weight=0.0)).output_dim == 128
    assert RetrievalModel(ModelConfig(shape=ShapeConfig(size=0))).shape is None


def test_shape_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.shape.size must be 0"):
        ShapeConfig(size=1)
    with pytest.raises(ValueError, match="model.shape.weight must be >= 0"):
        ShapeConfig(size=8, weight=-1)
    with pytest.raises(ValueError, match=r"model.shape.levels must be one of \('grey', 'ink'\)"):
        ShapeConfig(levels="luma")
    with pytest.raises(ValueError, match="model.shape.size 80 exceeds"):
        ModelConfig(shape=ShapeConfig(size=80))
