"""Query and document encoders with concept-aware modality fusion (DESIGN.md, point 2).

One :class:`RetrievalModel` holds the shared timm image backbone, a transformers text tower,
the fusion module and three projection heads (document image, query image, query text). All
embeddings are L2-normalised and live in one space. No Ray and no ``torch.distributed`` here:
the training job shards :meth:`RetrievalModel.shard_units` with FSDP2 itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from oclear_ray.config import (
    FusionConfig,
    ImageEncoderConfig,
    ModelConfig,
    ShapeConfig,
    TextEncoderConfig,
)
from oclear_ray.preprocess import PreprocessConfig

PARTS = ("doc", "query")


def with_backbone_preprocess(config: ModelConfig, image: ImageEncoder) -> ModelConfig:
    """``config`` with the pretrained backbone's mean, std, interpolation and crop (random-init
    backbones keep the configured ones)."""
    if not config.image.has_weights:
        return config
    return replace(config, preprocess=config.preprocess.with_backbone(image.data_config()))


def _fetch_error(what: str, exc: Exception) -> Exception:
    """Our own errors about local files and weights as they are; a failed fetch (what
    huggingface_hub, transformers or timm raise) as one line naming the model and the cache."""
    from huggingface_hub import constants

    ours = not type(exc).__module__.startswith(("huggingface_hub", "transformers", "timm"))
    if isinstance(exc, FileNotFoundError | ValueError) and ours:
        return exc

    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ValueError(
        f"cannot load the pretrained {what}: {reason}. Hub weights download into the Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}, set HF_HOME to move it); offline "
        "(HF_HUB_OFFLINE=1) they must be there already, or name a local folder or file"
    )


def resolve_pretrained(config: ModelConfig) -> ModelConfig:
    """Fetch or find every pretrained part ``config`` names, once, before any worker starts;
    return it with the backbone's preprocessing. A part that cannot be had is one ValueError
    (or FileNotFoundError for a missing local file) naming the model and the cache."""
    from oclear_ray.text import TextTokenizer

    if config.image.has_weights:
        try:
            image = ImageEncoder(config.image)
        except Exception as exc:
            raise _fetch_error(f"image backbone {config.image.model_id!r}", exc) from exc
        config = with_backbone_preprocess(config, image)
    if config.text.pretrained_path:
        path = config.text.pretrained_path
        try:
            TextEncoder(config.text)
            TextTokenizer.from_pretrained(path)
        except Exception as exc:
            raise _fetch_error(f"text model {path!r}", exc) from exc
    return config


class ImageStates(NamedTuple):
    """Image tower output: pooled vector [B, C_pool] and spatial tokens [B, N, C_tok]."""

    pooled: torch.Tensor
    tokens: torch.Tensor


class PairEmbeddings(NamedTuple):
    """A training pass's embeddings [B, D]: image-only and fused documents, query photos, and
    the documents' own text encoded as text queries (rows without text are meaningless)."""

    doc: torch.Tensor
    fused: torch.Tensor | None
    query: torch.Tensor
    text: torch.Tensor | None


class TextStates(NamedTuple):
    """Text tower output: token states [B, T, H], bool mask [B, T], masked-mean pooled [B, H]."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def create_backbone(config: ImageEncoderConfig) -> nn.Module:
    """The timm backbone without its classifier, with its weights when the config names some.

    A ``pretrained_path`` file is read by timm's checkpoint reader (safetensors or torch;
    ``state_dict`` / ``model`` / EMA wrappers and ``module.`` prefixes unwrapped) and loaded
    key by key: timm's own pretrained loading turns non-strict once the classifier is dropped
    and only logs keys that do not fit, so a wrong file would silently train from random init.
    Raises FileNotFoundError for a missing file, ValueError for weights of another model; a hub
    model timm cannot fetch raises what huggingface_hub raises (see :func:`resolve_pretrained`).
    """
    kwargs = dict(num_classes=0, **config.model_kwargs)
    net = timm.create_model(config.model_id, pretrained=bool(config.pretrained), **kwargs)
    if config.pretrained_path:
        path = Path(config.pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        missing, unexpected = net.load_state_dict(
            timm.models.load_state_dict(str(path)), strict=False
        )
        head = net.pretrained_cfg.get("classifier") or ()
        head_prefixes = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
        unexpected = [k for k in unexpected if not k.startswith(head_prefixes)]
        if missing or unexpected:
            raise ValueError(
                f"weights in {path} do not match the backbone: missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
            )
    return net


class ImageEncoder(nn.Module):
    """A timm backbone exposing a pooled vector and spatial tokens (CNN map cells or ViT tokens)."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        self.net = create_backbone(config)
        self.token_dim = self.net.num_features
        self.pooled_dim = getattr(self.net, "head_hidden_size", None) or self.net.num_features

    def forward(self, images: torch.Tensor) -> ImageStates:
        feats = self.net.forward_features(images)
        pooled = self.net.forward_head(feats, pre_logits=True)
        if feats.ndim == 3:  # ViT-style [B, N, C]: drop class/register tokens
            tokens = feats[:, getattr(self.net, "num_prefix_tokens", 0) :]
        elif getattr(self.net, "output_fmt", "NCHW") == "NHWC":
            tokens = feats.flatten(1, 2)
        else:
            tokens = feats.flatten(2).transpose(1, 2)
        return ImageStates(pooled, tokens)

    @property
    def architecture(self) -> str:
        """The timm architecture built (without tag or hub prefix): what an export recreates."""
        return self.net.pretrained_cfg.get("architecture") or self.config.name

    def data_config(self) -> dict:
        """The backbone's preprocessing (mean, std, interpolation, crop_pct) as timm resolves it."""
        return timm.data.resolve_data_config({}, model=self.net)

    def blocks(self) -> list[nn.Module]:
        """The backbone's feature stages (timm ``feature_info``), the natural FSDP units."""
        names = [info["module"] for info in getattr(self.net, "feature_info", [])]
        stages = [self.net.get_submodule(n) for n in dict.fromkeys(names) if n]
        return [m for m in stages if next(m.parameters(), None) is not None]


def _build_text_model(config: TextEncoderConfig) -> nn.Module:
    """The transformers encoder for ``config``, without its (unused) pooler, in float32."""
    if config.pretrained_path:
        model = AutoModel.from_pretrained(config.pretrained_path)
    elif config.hf_config:
        hf = dict(config.hf_config)
        model = AutoModel.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    else:
        hf = BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
        )
        model = BertModel(hf, add_pooling_layer=False)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # we mean-pool; an unused pooler would only add dead parameters
    return model.float()


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` [B, T, H] over positions where ``mask`` [B, T] is set; 0 if none."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TextEncoder(nn.Module):
    """A transformers encoder returning token states, the mask and a masked-mean pooled vector."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.model = _build_text_model(config)
        self.dim = self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextStates:
        mask = attention_mask.bool()
        safe = mask.clone()
        safe[:, 0] |= ~mask.any(1)  # text-free rows attend to one pad token: finite, then ignored
        tokens = self.model(input_ids=input_ids, attention_mask=safe.long()).last_hidden_state
        return TextStates(tokens, mask, masked_mean(tokens, mask))

    def blocks(self) -> list[nn.Module]:
        """The transformer layers, the natural FSDP units."""
        depth = getattr(self.model.config, "num_hidden_layers", None)
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth:
                return list(module)
        return []


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention plus MLP: a set of queries reads a (padded) key/value sequence."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor | None = None):
        kv = self.norm_kv(kv)
        x = x + self.attn(self.norm_q(x), kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class ConceptFusion(nn.Module):
    """Concept-aware fusion of an image and its text into one embedding, with a modality gate.

    K learned concept slots read the text tokens (the concepts the text states), then read the
    image tokens (text-to-image attention); their mean, projected, is the concept evidence. A gate
    g in [0, 1] from the pooled image, pooled text and log text length mixes the image embedding (g)
    with the concept evidence (1 - g). Rows without text take the image embedding as is (g = 1),
    so their output cannot depend on the text tower or the concept path.
    """

    def __init__(
        self, image: ImageEncoder, text: TextEncoder, config: FusionConfig, embed_dim: int
    ):
        super().__init__()
        dim = config.dim
        self.image_proj = nn.Linear(image.token_dim, dim)
        self.text_proj = nn.Linear(text.dim, dim)
        self.concepts = nn.Parameter(torch.randn(config.num_concepts, dim) * 0.02)
        block = (dim, config.num_heads, config.mlp_ratio, config.dropout)
        self.read_text, self.read_image = CrossAttentionBlock(*block), CrossAttentionBlock(*block)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, embed_dim))
        self.gate_image_norm = nn.LayerNorm(image.pooled_dim)
        self.gate_text_norm = nn.LayerNorm(text.dim)
        self.gate = nn.Sequential(
            nn.Linear(image.pooled_dim + text.dim + 1, dim), nn.GELU(), nn.Linear(dim, 1)
        )

    def concept_embedding(self, image: ImageStates, text: TextStates) -> torch.Tensor:
        """Concept evidence [B, D], unit length: concepts read the text, then the image."""
        pad = ~text.mask
        pad[:, 0] &= text.mask.any(1)  # text-free rows: keep one key so attention stays finite
        concepts = self.concepts.expand(text.tokens.shape[0], -1, -1)
        concepts = self.read_text(concepts, self.text_proj(text.tokens), pad)
        concepts = self.read_image(concepts, self.image_proj(image.tokens))
        return F.normalize(self.out(concepts.mean(1)), dim=-1)

    def gate_value(self, image: ImageStates, text: TextStates) -> torch.Tensor:
        """Weight of the image evidence per row, [B] in [0, 1]; exactly 1 where text is empty."""
        length = torch.log1p(text.mask.sum(1, keepdim=True).to(image.pooled.dtype))
        features = [self.gate_image_norm(image.pooled), self.gate_text_norm(text.pooled), length]
        gate = torch.sigmoid(self.gate(torch.cat(features, dim=-1))).squeeze(-1)
        return torch.where(text.mask.any(1), gate, torch.ones_like(gate))

    def forward(
        self, image_emb: torch.Tensor, image: ImageStates, text: TextStates
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused embedding [B, D] unit length, gate [B]) from a unit image embedding and states."""
        gate = self.gate_value(image, text)
        g = gate.unsqueeze(-1)
        fused = F.normalize(g * image_emb + (1 - g) * self.concept_embedding(image, text), dim=-1)
        return torch.where(text.mask.any(1, keepdim=True), fused, image_emb), gate


def dct_basis(n: int, k: int) -> torch.Tensor:
    """The first ``k`` orthonormal DCT-II basis vectors of length ``n``, [k, n]."""
    i, j = torch.arange(k, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)
    basis = torch.cos(torch.pi * (2 * j + 1) * i / (2 * n)) * (2.0 / n) ** 0.5
    basis[0] /= 2**0.5
    return basis.float()


class ShapeCode(nn.Module):
    """The image's coarse shape as a unit vector: the lowest k x k 2-D DCT frequencies of its
    grey levels or its ink (``ShapeConfig.levels``), the constant term left out (brightness
    does not count). No parameters: it is what pixel k-NN matches, and it keeps that match on
    renderings training never showed (line art of colour items, colour logos of monochrome
    marks)."""

    def __init__(self, config: ShapeConfig, preprocess: PreprocessConfig):
        super().__init__()
        size = preprocess.image_size
        self.levels = config.levels
        self.register_buffer("basis", dct_basis(size, config.size), persistent=False)
        # the pixels in [0, 1] are x_c std_c + mean_c
        std, mean = torch.tensor(preprocess.std), torch.tensor(preprocess.mean)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised images -> [B, k*k - 1] unit vectors."""
        levels = level_map(images.float() * self.std + self.mean, self.levels)
        coeffs = self.basis @ levels @ self.basis.T
        return F.normalize(coeffs.flatten(1)[:, 1:], dim=-1)


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601


def level_map(pixels: torch.Tensor, levels: str) -> torch.Tensor:
    """[B, 3, H, W] pixels in [0, 1] -> [B, H, W] grey levels ("grey": luma) or the level of
    the brightest channel ("ink": black ink stays, coloured fills read as paper)."""
    if levels == "ink":
        return pixels.amax(1)
    return torch.einsum("bchw,c->bhw", pixels, pixels.new_tensor(_LUMA))


class LevelView(nn.Module):
    """What the backbone sees of normalised images (``ImageEncoderConfig.levels``): one level
    map on all three channels, normalised again; a colour image stays as it is. Queries and
    documents pass through it alike, so line art and the colour drawing it outlines meet."""

    def __init__(self, levels: str, preprocess: PreprocessConfig):
        super().__init__()
        self.levels = levels
        std, mean = torch.tensor(preprocess.std), torch.tensor(preprocess.mean)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.levels == "rgb":
            return images
        pixels = images * self.std + self.mean
        return (level_map(pixels, self.levels).unsqueeze(1) - self.mean) / self.std


def _head(in_dim: int, out_dim: int) -> nn.Module:
    """Projection head into the shared embedding space."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))


class RetrievalModel(nn.Module):
    """Document and query encoders sharing one image backbone, one text tower and the fusion.

    ``parts`` selects which heads exist: ``("doc",)`` builds only the document encoder,
    ``("query",)`` only the query encoder (used when loading an exported encoder).
    """

    def __init__(self, config: ModelConfig, *, parts: Sequence[str] = PARTS):
        super().__init__()
        if not parts or set(parts) - set(PARTS):
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {tuple(parts)}")
        self.parts = tuple(p for p in PARTS if p in parts)
        self.image_encoder = ImageEncoder(config.image)
        self.config = with_backbone_preprocess(config, self.image_encoder)
        self.text_encoder = TextEncoder(config.text)
        self.fusion = ConceptFusion(
            self.image_encoder, self.text_encoder, config.fusion, config.embed_dim
        )
        image_dim, text_dim, dim = (
            self.image_encoder.pooled_dim,
            self.text_encoder.dim,
            config.embed_dim,
        )
        self.doc_image_head = _head(image_dim, dim) if "doc" in parts else None
        self.query_image_head = _head(image_dim, dim) if "query" in parts else None
        self.query_text_head = _head(text_dim, dim) if "query" in parts else None
        shape = self.config.shape
        self.shape = ShapeCode(shape, self.config.preprocess) if shape.dim else None
        self.view = LevelView(config.image.levels, self.config.preprocess)

    def encode_pair(
        self,
        doc_images: torch.Tensor,
        query_images: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> PairEmbeddings:
        """Training pass: image-only and fused document embeddings, query-photo embeddings, and
        the documents' text as text queries (fused and text are None without ``input_ids``);
        the learned part only (the classifier's space), without the shape code.

        One backbone pass over documents and query photos together, so that batch-norm
        statistics mix both domains as the running statistics used at inference do; one text
        pass, read by the fusion and the text query head alike; then each side's head.
        """
        n = doc_images.shape[0]
        image = self.image_encoder(self.view(torch.cat([doc_images, query_images])))
        docs = ImageStates(image.pooled[:n], image.tokens[:n])
        doc = F.normalize(self.doc_image_head(docs.pooled), dim=-1)
        fused = text_query = None
        if input_ids is not None:
            text = self._text(input_ids, attention_mask)
            fused, _ = self.fusion(doc, docs, text)
            text_query = F.normalize(self.query_text_head(text.pooled), dim=-1)
        query = F.normalize(self.query_image_head(image.pooled[n:]), dim=-1)
        return PairEmbeddings(doc, fused, query, text_query)

    def forward(self, *args, **kwargs) -> PairEmbeddings:
        """The training pass, ``encode_pair``: what FSDP2 and DDP hook."""
        return self.encode_pair(*args, **kwargs)

    def _require(self, part: str) -> None:
        if part not in self.parts:
            raise RuntimeError(f"this model was built with parts={self.parts}, not {part!r}")

    def _text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> TextStates:
        if attention_mask is None:
            raise ValueError("attention_mask is required with input_ids")
        return self.text_encoder(input_ids, attention_mask)

    def encode_doc(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        return_gate: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Document embeddings [B, D] (and the image gate [B]); without text: image only, gate 1."""
        self._require("doc")
        emb, gate = self._encode_image(images, self.doc_image_head, input_ids, attention_mask)
        emb = self._with_shape(emb, images)
        return (emb, gate) if return_gate else emb

    def encode_query(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        return_gate: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Query embeddings [B, D] from a photo, a typed text, or both (fused like a document).

        The gate is 1 for image-only, 0 for text-only queries.
        """
        self._require("query")
        if images is None and input_ids is None:
            raise ValueError("encode_query needs images, input_ids (text), or both; got neither")
        if images is None:
            emb = self._with_shape(self._text_query(self._text(input_ids, attention_mask)))
            gate = torch.zeros_like(emb[:, 0])
            return (emb, gate) if return_gate else emb
        emb, gate = self._encode_image(images, self.query_image_head, input_ids, attention_mask)
        emb = self._with_shape(emb, images)
        return (emb, gate) if return_gate else emb

    def _with_shape(self, emb: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The learned embedding with the images' shape code beside it (zeros for a text-only
        query: it has no shape), weighted, unit length; as is without a shape code."""
        if self.shape is None:
            return emb
        if images is None:
            code = emb.new_zeros(emb.shape[0], self.config.shape.dim)
        else:
            code = self.shape(images).to(emb.dtype)
        return F.normalize(torch.cat([emb, self.config.shape.weight * code], dim=-1), dim=-1)

    def _encode_image(
        self,
        images: torch.Tensor,
        head: nn.Module,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embedding through ``head``, fused with the text when given: (emb, gate)."""
        image = self.image_encoder(self.view(images))
        emb = F.normalize(head(image.pooled), dim=-1)
        if input_ids is None:
            return emb, torch.ones_like(emb[:, 0])
        return self.fusion(emb, image, self._text(input_ids, attention_mask))

    def _text_query(self, text: TextStates) -> torch.Tensor:
        """Text-only query embedding; every row must carry some text."""
        empty = (~text.mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"text-only query rows {empty[:10]} have no text tokens")
        return F.normalize(self.query_text_head(text.pooled), dim=-1)

    def shard_units(self) -> list[nn.Module]:
        """Submodules to wrap with FSDP2 ``fully_shard`` (in forward order) before the root."""
        return [*self.image_encoder.blocks(), *self.text_encoder.blocks(), self.fusion]
