"""Export the query and document encoders, and load them back from the export alone.

Layout of an export directory (``train/model/``)::

    query_encoder.safetensors   backbone + text tower + fusion + query heads
    doc_encoder.safetensors     backbone + text tower + fusion + document head
    tokenizer.json              the text tokenizer
    config.json                 model config tree (incl. preprocessing), file digests, the
                                document view, model_version

Each weights file is self-contained (shared weights are duplicated), so a serving replica loads
only the query encoder and an embedding actor only the document encoder. Files are written to a
temporary name and renamed, ``config.json`` last (training publishes a local export to the work
directory the same way: ``storage.publish_dir``); ``model_version`` is the first 16 hex digits of
a sha256 over the config and the file digests, and loading (from a path or a URI) reads only the
files config.json names and refuses any that does not match it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
from tokenizers import Tokenizer

from oclear_ray.config import ModelConfig
from oclear_ray.model import RetrievalModel
from oclear_ray.preprocess import ImageInput, PreprocessConfig, images_to_tensor
from oclear_ray.text import TextTokenizer

FORMAT = "oclear-ray/encoders/v1"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
ImageBatch = Sequence[ImageInput] | torch.Tensor
PART_FILES = {"query": "query_encoder.safetensors", "doc": "doc_encoder.safetensors"}
_OTHER_HEADS = {"query": ("doc_image_head.",), "doc": ("query_image_head.", "query_text_head.")}


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a state dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(manifest: dict) -> str:
    """model_version: sha256 of the canonical JSON of everything but the version itself."""
    body = {k: v for k, v in manifest.items() if k != "model_version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp_path)`` then rename, so readers never see a partial file.
    (``storage.open_output`` is the project's one atomic writer, but it needs pyarrow, and the
    export must load where only torch is installed: the GPU check's machine.)"""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def inference_autocast(device):
    """The autocast context the exported encoders run their forward under on ``device``
    (embedding, evaluation and serving alike).

    On CUDA: bfloat16 where the GPU supports it (the precision GPU training runs in, with
    float32's range), else float16 (pre-Ampere GPUs). Elsewhere none: CPU inference stays
    float32. Callers turn the outputs to float32 (``.float()``) before they leave the encoder.
    """
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def exported_config(model: RetrievalModel) -> ModelConfig:
    """The model's config made self-contained: the architecture, no weight sources (the export
    holds the weights), the full text config, the resolved preprocessing."""
    config = model.config
    text_config = model.text_encoder.model.config.to_dict()
    image = model.image_encoder
    return dataclasses.replace(
        config,
        image=dataclasses.replace(
            config.image, name=image.architecture, pretrained=False, pretrained_path=None
        ),
        text=dataclasses.replace(config.text, pretrained_path=None, hf_config=text_config),
    )


def part_state(model: RetrievalModel, part: str) -> dict[str, torch.Tensor]:
    """CPU copies of the tensors one encoder needs (copies: safetensors refuses shared storage)."""
    if part not in model.parts:
        raise ValueError(f"model was built with parts={model.parts}; cannot export {part!r}")
    return {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith(_OTHER_HEADS[part])
    }


def export_model(model: RetrievalModel, tokenizer: TextTokenizer, out_dir: str | Path) -> str:
    """Write both encoders, the tokenizer and config.json into ``out_dir``; return model_version.

    ``model`` must be a full (unsharded) model with both parts.
    """
    rows = model.text_encoder.model.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the text encoder only "
            f"{rows} embeddings; set text.vocab_size >= {tokenizer.vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for part, name in PART_FILES.items():
        state = part_state(model, part)
        files[name] = tensors_digest(state)
        metadata = {"format": FORMAT, "part": part}
        _write_atomic(out / name, partial(safetensors.torch.save_file, state, metadata=metadata))
    _write_atomic(out / TOKENIZER_FILE, tokenizer.save)
    files[TOKENIZER_FILE] = _file_sha256(out / TOKENIZER_FILE)
    manifest = {"format": FORMAT, "model": exported_config(model).to_dict(), "files": files}
    manifest = json.loads(json.dumps(manifest))  # canonical JSON types (e.g. int dict keys)
    manifest["model_version"] = _version(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    _write_atomic(out / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return manifest["model_version"]


def doc_view_of(manifest: dict) -> str:
    """The document view an export embeds documents in (``embed.DOC_VIEWS``): fused with their
    text unless a choice (:func:`revise`) made it the image alone."""
    return manifest.get("doc_view", "fused")


def revise(
    model_dir: str,
    *,
    doc_view: str,
    shape_weight: float,
    choice: dict,
    shape_levels: str | None = None,
) -> str:
    """Set an export's document view and shape code (its weight, and its levels unless None;
    the weights stay: none of them is trained) and record the ``choice`` that picked them;
    return the new model_version (it covers them, so embeddings and indexes of the old settings
    are refused)."""
    from oclear_ray import storage

    manifest = read_manifest(model_dir)
    manifest["model"]["shape"]["weight"] = float(shape_weight)
    if shape_levels is not None:
        manifest["model"]["shape"]["levels"] = shape_levels
    ModelConfig.from_dict(manifest["model"])  # still a valid model
    manifest |= {"doc_view": doc_view, "view_choice": choice}
    manifest = json.loads(json.dumps(manifest))
    manifest["model_version"] = _version(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.write_bytes(storage.join(str(model_dir), CONFIG_FILE), text)
    return manifest["model_version"]


def _read(model_dir: str | Path, name: str) -> bytes:
    """A file of an export, local or a URI on shared storage (storage, i.e. pyarrow, imported
    only then: the GPU check runs without it)."""
    if "://" in str(model_dir):
        from oclear_ray import storage

        return storage.read_bytes(storage.join(str(model_dir), name))
    return (Path(model_dir) / name).read_bytes()


def read_manifest(model_dir: str | Path) -> dict:
    """config.json of an export, checked: known format and a model_version that matches it."""
    path = f"{str(model_dir).rstrip('/')}/{CONFIG_FILE}"
    try:
        manifest = json.loads(_read(model_dir, CONFIG_FILE))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no exported model at {model_dir}: {CONFIG_FILE} is missing"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("model_version") != _version(manifest):
        raise ValueError(
            f"{path}: model_version {manifest.get('model_version')!r} does not "
            "match its content (edited or corrupt)"
        )
    return manifest


@dataclasses.dataclass
class ExportedEncoder:
    """A loaded encoder with what it needs to turn raw inputs into embeddings."""

    model: RetrievalModel
    tokenizer: TextTokenizer
    preprocess: PreprocessConfig
    model_version: str
    #: the view its documents are embedded in: "fused" or "image_only" (:func:`revise`)
    doc_view: str = "fused"

    def images(self, images: ImageBatch) -> torch.Tensor:
        """Encoded images (bytes / PIL) -> normalised tensor on the model's device."""
        if not isinstance(images, torch.Tensor):
            images = images_to_tensor(images, self.preprocess)
        return images.to(self._device)

    def texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids, attention_mask) on the model's device."""
        ids, mask = self.tokenizer.encode(
            texts, self.preprocess.max_text_length, padding="longest", return_tensors="pt"
        )
        return ids.to(self._device), mask.to(self._device)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode_doc(
        self, images: ImageBatch, texts: Sequence[str] | None = None, *, return_gate: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Document embeddings [B, D] (and gates [B]) from images and optional texts, float32
        (computed under :func:`inference_autocast` of the model's device)."""
        text = self.texts(texts) if texts is not None else (None, None)
        with inference_autocast(self._device):
            out = self.model.encode_doc(self.images(images), *text, return_gate=return_gate)
        return _float(out)

    @torch.inference_mode()
    def encode_query(
        self,
        images: ImageBatch | None = None,
        texts: Sequence[str] | None = None,
        *,
        return_gate: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Query embeddings [B, D] (and gates [B]) from images, texts, or both, float32
        (computed under :func:`inference_autocast` of the model's device)."""
        pixels = self.images(images) if images is not None else None
        text = self.texts(texts) if texts is not None else (None, None)
        with inference_autocast(self._device):
            out = self.model.encode_query(pixels, *text, return_gate=return_gate)
        return _float(out)


def _float(out: torch.Tensor | tuple) -> torch.Tensor | tuple:
    return tuple(t.float() for t in out) if isinstance(out, tuple) else out.float()


def _load(model_dir: str | Path, part: str) -> ExportedEncoder:
    """Rebuild one encoder from config.json and the files it names, checking their digests."""
    manifest = read_manifest(model_dir)
    files, name = manifest["files"], PART_FILES[part]
    state = safetensors.torch.load(_read(model_dir, name))
    if tensors_digest(state) != files[name]:
        raise ValueError(
            f"{model_dir}/{name} does not match {CONFIG_FILE} "
            f"(model_version {manifest['model_version']}): mixed or partial export"
        )
    tokenizer = _read(model_dir, TOKENIZER_FILE)
    if hashlib.sha256(tokenizer).hexdigest() != files[TOKENIZER_FILE]:
        raise ValueError(f"{model_dir}/{TOKENIZER_FILE} does not match {CONFIG_FILE}")
    config = ModelConfig.from_dict(manifest["model"])
    model = RetrievalModel(config, parts=(part,))
    model.load_state_dict(state, strict=True)
    return ExportedEncoder(
        model=model.eval(),
        tokenizer=TextTokenizer(Tokenizer.from_str(tokenizer.decode())),
        preprocess=config.preprocess,
        model_version=manifest["model_version"],
        doc_view=doc_view_of(manifest),
    )


def load_query_encoder(model_dir: str | Path) -> ExportedEncoder:
    """The query encoder of an export (``encode_query``), in eval mode on CPU."""
    return _load(model_dir, "query")


def load_doc_encoder(model_dir: str | Path) -> ExportedEncoder:
    """The document encoder of an export (``encode_doc``), in eval mode on CPU."""
    return _load(model_dir, "doc")
