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
    pixels = decode_image(encode(img, "PNG"), 16)
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)
    assert pixels[5, 5].tolist() == [255, 255, 255]
    assert pixels[0, 0].tolist() == [255, 0, 0]


def test_palette_transparency_and_grayscale_become_rgb():
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG"), 16)[3, 3].tolist() == [255, 255, 255]
    grey = Image.new("L", (16, 16), 100)
    assert decode_image(encode(grey, "PNG"), 16)[0, 0].tolist() == [100, 100, 100]


def test_jpeg_and_webp_are_resized():
    img = Image.new("RGB", (40, 24), (0, 0, 255))
    for fmt in ("JPEG", "WEBP"):
        pixels = decode_image(encode(img, fmt), 16)
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
        decode_image(good[:40], 16)  # truncated PNG


def test_config_validation_and_plain_dict():
    with pytest.raises(ValueError, match="std values must be > 0"):
        PreprocessConfig(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="image_size must be >= 8, got 4"):
        PreprocessConfig(image_size=4)
    assert PreprocessConfig(**CFG.to_dict()) == CFG
