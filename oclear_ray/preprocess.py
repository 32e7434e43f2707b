"""Inference-time preprocessing that travels with an exported model.

Decoding and normalisation live here (not in training code) so that the embedding job and the
serving app turn image bytes into exactly the tensors the encoders were trained on. Training-time
augmentation is applied on top of :func:`decode_image` by the training pipeline.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ImageInput = bytes | bytearray | memoryview | Image.Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: PIL resampling filters by the names timm's pretrained configs use
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(kw_only=True)
class PreprocessConfig:
    """How raw inputs become model inputs: image size, resize and crop, RGB mean/std, tokens.

    An image's shorter side is resized (``interpolation``) to ``image_size / crop_pct``, then
    its centre ``image_size`` square is kept (timm's evaluation transform; a square image at
    ``crop_pct`` 1.0 is simply resized). With ``from_backbone`` (the default) and a pretrained
    image backbone, mean, std, interpolation and crop_pct are the backbone's own
    (``timm.data.resolve_data_config``), resolved once when the model is built and exported
    with it; set it to false to keep the values given here.
    """

    image_size: int = 64
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    from_backbone: bool = True
    max_text_length: int = 64

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be > 0, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.max_text_length < 2:
            raise ValueError(
                f"max_text_length must be >= 2 ([CLS] + [SEP]), got {self.max_text_length}"
            )

    def with_backbone(self, data_config: dict) -> PreprocessConfig:
        """These settings with the backbone's mean, std, interpolation and crop_pct (a timm
        data config), unless ``from_backbone`` is off."""
        if not self.from_backbone:
            return self
        interpolation = data_config.get("interpolation", self.interpolation)
        return replace(
            self,
            mean=tuple(data_config.get("mean", self.mean)),
            std=tuple(data_config.get("std", self.std)),
            interpolation=interpolation if interpolation in INTERPOLATIONS else self.interpolation,
            crop_pct=float(data_config.get("crop_pct") or self.crop_pct),
        )

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


def _open(data: ImageInput) -> Image.Image:
    """Open and fully decode an image, turning any decoder failure into a ValueError."""
    if isinstance(data, Image.Image):
        return data
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL image; transparent pixels are composited onto white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def fit_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image -> uint8 array [S, S, 3]: shorter side to ``S / crop_pct``, centre crop."""
    size = cfg.image_size
    if img.size != (size, size) or cfg.crop_pct < 1.0:
        mode = InterpolationMode(cfg.interpolation)
        img = TF.resize(img, math.floor(size / cfg.crop_pct), interpolation=mode)
        img = TF.center_crop(img, [size, size])
    return np.asarray(img, dtype=np.uint8)


def decode_image(data: ImageInput, cfg: PreprocessConfig) -> np.ndarray:
    """Encoded bytes (PNG/JPEG/WebP/...) or a PIL image -> uint8 array [S, S, 3] (``fit_image``).

    Raises ValueError for bytes that are not a decodable image.
    """
    return fit_image(to_rgb(_open(data)), cfg)


def normalize(pixels, cfg: PreprocessConfig, device=None) -> torch.Tensor:
    """uint8 [B, H, W, 3] (array or tensor) -> float32 [B, 3, H, W] on ``device``, normalised
    with the config's mean and std: the one place training, serving and export do it."""
    pixels = torch.as_tensor(pixels, device=device)
    mean = torch.tensor(cfg.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous()


def images_to_tensor(images: Sequence[ImageInput], cfg: PreprocessConfig) -> torch.Tensor:
    """Decode a batch of encoded images (or PIL images) into a float tensor [B, 3, S, S].

    The error for an undecodable item names its position in the batch.
    """
    pixels = np.empty((len(images), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        try:
            pixels[i] = decode_image(data, cfg)
        except ValueError as exc:
            raise ValueError(f"image {i} of {len(images)}: {exc}") from exc
    return normalize(pixels, cfg)
