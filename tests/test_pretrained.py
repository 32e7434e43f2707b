"""Pretrained starts from folders the test writes the standard way (a random-init timm backbone
through ``save_for_hf``, a tiny BERT and its tokenizer through ``save_pretrained``): the weights,
the backbone's preprocessing and the text model's own tokenizer reach the export; a part that
cannot be had is one clear error on the driver, before Ray or any data is touched."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from oclear_ray.config import ImageEncoderConfig, ModelConfig, TextEncoderConfig, TrainConfig
from oclear_ray.export import export_model, load_doc_encoder, load_query_encoder
from oclear_ray.model import RetrievalModel, resolve_pretrained
from oclear_ray.preprocess import PreprocessConfig
from oclear_ray.text import TextTokenizer
from oclear_ray.train import fit
from tests.tiny import BACKBONE_PREPROCESS

TEXTS = ["Red mug", "", "blue steel bottle with a lid"]


@pytest.fixture(scope="module")
def folders(pretrained_folders):
    return pretrained_folders


def pretrained_config(root, **preprocess) -> ModelConfig:
    return ModelConfig(
        image=ImageEncoderConfig(pretrained=f"local-dir:{root / 'cnn'}"),
        text=TextEncoderConfig(pretrained_path=str(root / "bert")),
        preprocess=PreprocessConfig(image_size=32, max_text_length=16, **preprocess),
        embed_dim=16,
    )


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_backbone_weights_and_preprocessing_come_from_the_pretrained_folder(folders):
    root, net = folders
    model = RetrievalModel(pretrained_config(root))
    loaded = model.image_encoder.net.state_dict()
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    pre = model.config.preprocess
    got = {k: getattr(pre, k) for k in BACKBONE_PREPROCESS}
    assert got == BACKBONE_PREPROCESS and pre.image_size == 32
    mine = {"mean": (0.1, 0.1, 0.1), "crop_pct": 1.0, "from_backbone": False}
    kept = RetrievalModel(pretrained_config(root, **mine)).config.preprocess
    assert kept.mean == (0.1, 0.1, 0.1) and kept.crop_pct == 1.0


def test_the_text_models_own_tokenizer_encodes_as_transformers_does(folders):
    root, _ = folders
    ours = TextTokenizer.from_pretrained(str(root / "bert"))
    theirs = AutoTokenizer.from_pretrained(str(root / "bert"))
    ids, mask = ours.encode(TEXTS, 16, padding="longest")
    for row, text in enumerate(TEXTS):
        expected = theirs(text)["input_ids"] if text else []
        assert ids[row, : mask[row].sum()].tolist() == expected
    assert not mask[1].any()  # no text: no tokens
    assert ours.pad_id == theirs.pad_token_id and ours.vocab_size == len(theirs)


def test_export_holds_the_weights_the_tokenizer_and_the_preprocessing(folders, tmp_path):
    root, _ = folders
    model = RetrievalModel(pretrained_config(root)).eval()
    tokenizer = TextTokenizer.from_pretrained(str(root / "bert"))
    export_model(model, tokenizer, tmp_path / "out")
    doc, query = load_doc_encoder(tmp_path / "out"), load_query_encoder(tmp_path / "out")
    image = doc.model.config.image
    assert (image.name, image.pretrained, image.pretrained_path) == ("resnet10t", False, None)
    assert doc.preprocess == model.config.preprocess == query.preprocess
    assert doc.preprocess.crop_pct == BACKBONE_PREPROCESS["crop_pct"]
    ids, _ = doc.tokenizer.encode(TEXTS, 16)
    assert torch.equal(torch.as_tensor(ids), torch.as_tensor(tokenizer.encode(TEXTS, 16)[0]))
    images = [png((200, 20, 20)), png((20, 20, 200)), png((20, 200, 20))]
    with torch.no_grad():
        pixels, (ids, mask) = doc.images(images), doc.texts(TEXTS)
        assert torch.equal(doc.encode_doc(images, TEXTS), model.encode_doc(pixels, ids, mask))


def test_resolve_on_the_driver_fills_the_backbone_preprocessing(folders):
    root, _ = folders
    resolved = resolve_pretrained(pretrained_config(root))
    assert resolved.preprocess.mean == BACKBONE_PREPROCESS["mean"]
    plain = ModelConfig()
    assert resolve_pretrained(plain) == plain  # nothing pretrained: nothing to fetch


def _train_config(**image) -> TrainConfig:
    return TrainConfig.from_dict({"model": {"image": image}})


def test_missing_weights_file_fails_on_the_driver_before_any_data(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match="weights file not found: .*none.safetensors"):
        fit(
            _train_config(pretrained_path=str(missing)),
            catalog=str(tmp_path / "no-catalog.parquet"),
            workdir=str(tmp_path / "w"),
        )
    assert not (tmp_path / "w").exists()


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable at once (as with HF_HUB_OFFLINE=1 and an empty cache)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent")
    return "/nonexistent"


def test_unreachable_hub_models_are_one_clear_error_naming_model_and_cache(offline, tmp_path):
    with pytest.raises(ValueError) as image_error:
        fit(
            _train_config(pretrained="convnext_atto.d2_in1k"),
            catalog=str(tmp_path / "no-catalog.parquet"),
            workdir=str(tmp_path / "w"),
        )
    message = str(image_error.value)
    assert "image backbone 'convnext_atto.d2_in1k'" in message
    assert "HF_HUB_OFFLINE" in message and offline in message and "\n" not in message
    text = ModelConfig(text=TextEncoderConfig(pretrained_path="someone/no-such-bert"))
    with pytest.raises(ValueError, match="text model 'someone/no-such-bert'.*Hugging Face cache"):
        resolve_pretrained(text)


def test_image_config_refuses_two_weight_sources_and_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        ImageEncoderConfig(pretrained=True, pretrained_path=str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="unknown timm model name 'nonet.tag'"):
        ImageEncoderConfig(pretrained="nonet.tag")
    with pytest.raises(ValueError, match="image.pretrained must be true, false or"):
        ImageEncoderConfig(pretrained=3)


@pytest.mark.ray
def test_gpu_recipe_shrunk_from_pretrained_parts_trains_embeds_indexes_and_serves(
    demo_run, folders
):
    """``configs/gpu.yaml`` at CPU sizes (bf16, ArcFace, Partial FC 0.1, augmentation, photo
    views of documents), started from the local pretrained backbone and text model, through
    ``oclear demo``: synth -> govern -> train (2 workers) -> embed -> index -> evaluate -> serve
    -> one search over HTTP. (The session's one demo run, tests/conftest.py, is this recipe.)"""
    import json

    import yaml

    root, net = folders
    with open(demo_run.config) as f:
        cfg = yaml.safe_load(f)
    assert cfg["model"]["image"]["pretrained"] == f"local-dir:{root / 'cnn'}"
    assert cfg["model"]["text"]["pretrained_path"] == str(root / "bert")
    assert cfg["run"]["workers"] == 2 and not cfg["run"]["use_gpu"]
    assert (cfg["run"]["precision"], cfg["head"]["sample_rate"]) == ("bf16", 0.1)
    with open("configs/gpu.yaml") as f:
        recipe = yaml.safe_load(f)
    for section in ("head", "optim"):
        assert cfg[section] == recipe[section]
    for key in ("cache", "augment", "doc_as_query_rate"):
        assert cfg["data"][key] == recipe["data"][key]
    result = demo_run.result
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "search page: http://127.0.0.1:" in result.output and "score" in result.output

    model_dir = demo_run.model_dir
    manifest = json.loads((model_dir / "config.json").read_text())
    pre = PreprocessConfig(**manifest["model"]["preprocess"])
    assert {k: getattr(pre, k) for k in BACKBONE_PREPROCESS} == BACKBONE_PREPROCESS
    exported = TextTokenizer.from_file(model_dir / "tokenizer.json").tokenizer.get_vocab()
    assert exported == AutoTokenizer.from_pretrained(str(root / "bert")).get_vocab()
    trained = load_doc_encoder(model_dir).model.image_encoder.net.state_dict()
    start = net.state_dict()
    close = [
        float(torch.nn.functional.cosine_similarity(trained[k].flatten(), start[k].flatten(), 0))
        for k in trained
        if k.endswith("conv.weight") or k.endswith("conv1.weight") or k.endswith(".0.weight")
    ]
    assert close and min(close) > 0.9  # trained from the pretrained weights, not from scratch
