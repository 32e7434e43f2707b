"""Inference preprocessing: decode PNG/JPEG/WebP/grey, composite alpha on white, normalise."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from oclear_ray.preprocess import PreprocessConfig, decode_image, images_to_tensor

CFG = PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_png_with_alpha_is_composited_on_white():
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (255, 0, 0, 255))
    pixels = decode_image(encode(img, "PNG"), CFG)
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)
    assert pixels[5, 5].tolist() == [255, 255, 255]
    assert pixels[0, 0].tolist() == [255, 0, 0]


def test_palette_transparency_and_grayscale_become_rgb():
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG"), CFG)[3, 3].tolist() == [255, 255, 255]
    grey = Image.new("L", (16, 16), 100)
    assert decode_image(encode(grey, "PNG"), CFG)[0, 0].tolist() == [100, 100, 100]


def test_jpeg_and_webp_are_resized():
    img = Image.new("RGB", (40, 24), (0, 0, 255))
    for fmt in ("JPEG", "WEBP"):
        pixels = decode_image(encode(img, fmt), CFG)
        assert pixels.shape == (16, 16, 3)
        assert pixels[8, 8, 2] > 240 and pixels[8, 8, 0] < 15


def test_batch_is_normalised_with_config_mean_std():
    white = encode(Image.new("RGB", (16, 16), (255, 255, 255)), "PNG")
    black = Image.new("RGB", (16, 16), (0, 0, 0))  # a PIL image is accepted as is
    batch = images_to_tensor([white, black], CFG)
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(batch[1, :, 0, 0], torch.tensor([-1.0, -2.0, -1.0]))


def test_non_image_bytes_are_a_clear_error():
    good = encode(Image.new("RGB", (16, 16)), "PNG")
    with pytest.raises(ValueError, match="image 1 of 2: cannot decode image"):
        images_to_tensor([good, b"definitely not an image"], CFG)
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(good[:40], CFG)  # truncated PNG


def test_config_validation_and_plain_dict():
    with pytest.raises(ValueError, match="std values must be > 0"):
        PreprocessConfig(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="image_size must be >= 8, got 4"):
        PreprocessConfig(image_size=4)
    assert PreprocessConfig(**CFG.to_dict()) == CFG


def test_resize_keeps_the_aspect_and_crops_the_centre():
    img = Image.new("RGB", (48, 24), (255, 0, 0))
    img.paste((0, 0, 255), (12, 0, 36, 24))  # a blue middle half
    whole = decode_image(img, CFG)  # shorter side 24 -> 16, then the centre 16 of 32 columns
    assert whole.shape == (16, 16, 3)
    assert (whole[:, 1:15, 2] > 200).all() and (whole[:, 1:15, 0] < 60).all()  # no red: cropped
    tight = PreprocessConfig(image_size=16, crop_pct=0.5, interpolation="nearest")
    square = Image.new("RGB", (16, 16), (255, 255, 255))
    square.paste((0, 0, 0), (4, 4, 12, 12))  # a black centre quarter
    out = decode_image(square, tight)  # resized to 32, centre 16 kept: the black quarter, grown
    assert (out == 0).all()


def test_backbone_settings_replace_the_given_ones_unless_told_not_to():
    timm_cfg = {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.2, 0.2, 0.2),
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "input_size": (3, 224, 224),
    }
    got = PreprocessConfig(image_size=32).with_backbone(timm_cfg)
    assert (got.mean, got.std, got.interpolation, got.crop_pct) == (
        (0.5,) * 3,
        (0.2,) * 3,
        "bilinear",
        0.875,
    )
    assert got.image_size == 32  # the input size stays the config's
    kept = PreprocessConfig(from_backbone=False)
    assert kept.with_backbone(timm_cfg) == kept
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\], got 1.5"):
        PreprocessConfig(crop_pct=1.5)
    with pytest.raises(ValueError, match="interpolation must be one of .* got 'cubic'"):
        PreprocessConfig(interpolation="cubic")
