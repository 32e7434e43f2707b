"""Export to safetensors + config.json, reload from the export alone, identical embeddings."""

import copy
import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from oclear_ray.config import ImageEncoderConfig, ModelConfig, TextEncoderConfig
from oclear_ray.export import (
    CONFIG_FILE,
    PART_FILES,
    TOKENIZER_FILE,
    export_model,
    load_doc_encoder,
    load_query_encoder,
    read_manifest,
)
from oclear_ray.model import RetrievalModel
from oclear_ray.preprocess import PreprocessConfig, images_to_tensor
from oclear_ray.text import train_tokenizer

TEXTS = ["red apple, fruit", "", "grinning face with big eyes"]


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [png((255, 0, 0, 255)), png((0, 128, 0, 128)), png((10, 20, 200, 255))]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 2, vocab_size=100)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(
        image=ImageEncoderConfig(name="resnet10t"),  # BatchNorm: buffers go through export too
        text=TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=16),
        preprocess=PreprocessConfig(image_size=32, max_text_length=16),
    )
    model = RetrievalModel(config).eval()
    with torch.no_grad():  # move BatchNorm statistics off their defaults
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def export_dir(model, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    export_model(model, tokenizer, out)
    return out


def inputs(model, tokenizer):
    images = images_to_tensor(IMAGES, model.config.preprocess)
    ids, mask = tokenizer.encode(TEXTS, 16, padding="longest", return_tensors="pt")
    return images, ids, mask


def test_export_writes_four_files_and_a_versioned_config(export_dir):
    names = sorted(p.name for p in export_dir.iterdir())
    assert names == sorted([CONFIG_FILE, TOKENIZER_FILE, *PART_FILES.values()])  # no temp files
    manifest = json.loads((export_dir / CONFIG_FILE).read_text())
    assert len(manifest["model_version"]) == 16
    int(manifest["model_version"], 16)
    assert manifest["model"]["preprocess"]["image_size"] == 32
    assert manifest["model"]["text"]["hf_config"]["hidden_size"] == 128


def test_weight_files_are_self_contained(export_dir, model):
    query = load_file(export_dir / PART_FILES["query"])
    doc = load_file(export_dir / PART_FILES["doc"])
    backbone = [k for k in model.state_dict() if k.startswith("image_encoder.")]
    for name in backbone:
        assert torch.equal(query[name], doc[name])
    assert any(k.startswith("query_text_head.") for k in query)
    assert not any(k.startswith("doc_image_head.") for k in query)
    assert not any(k.startswith("query_") for k in doc)


def test_reloaded_encoders_give_identical_embeddings(export_dir, model, tokenizer):
    images, ids, mask = inputs(model, tokenizer)
    doc, query = load_doc_encoder(export_dir), load_query_encoder(export_dir)
    with torch.no_grad():
        expected_doc, expected_gate = model.encode_doc(images, ids, mask, return_gate=True)
        got_doc, got_gate = doc.encode_doc(IMAGES, TEXTS, return_gate=True)
        assert torch.equal(got_doc, expected_doc) and torch.equal(got_gate, expected_gate)
        assert torch.equal(query.encode_query(IMAGES), model.encode_query(images))
        assert torch.equal(query.encode_query(IMAGES, TEXTS), model.encode_query(images, ids, mask))
        text_rows = [TEXTS[0], TEXTS[2]]
        expected_text = model.encode_query(input_ids=ids[[0, 2]], attention_mask=mask[[0, 2]])
        torch.testing.assert_close(
            query.encode_query(texts=text_rows), expected_text, atol=1e-6, rtol=0
        )
    assert doc.preprocess == model.config.preprocess
    assert doc.tokenizer.encode(TEXTS, 16)[0].tolist() == tokenizer.encode(TEXTS, 16)[0].tolist()


def test_model_version_is_stable_and_tracks_weights(export_dir, model, tokenizer, tmp_path):
    version = read_manifest(export_dir)["model_version"]
    assert load_query_encoder(export_dir).model_version == version
    assert load_doc_encoder(export_dir).model_version == version
    assert export_model(model, tokenizer, tmp_path / "again") == version
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.doc_image_head[1].bias.add_(1e-3)
    assert export_model(changed, tokenizer, tmp_path / "changed") != version


def test_loading_refuses_a_mixed_or_edited_export(export_dir, tmp_path):
    for path in export_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    state = load_file(tmp_path / PART_FILES["doc"])
    state["doc_image_head.1.bias"] = state["doc_image_head.1.bias"] + 1
    save_file(state, tmp_path / PART_FILES["doc"])
    with pytest.raises(ValueError, match="does not match config.json"):
        load_doc_encoder(tmp_path)
    load_query_encoder(tmp_path)  # the query file is intact
    manifest = json.loads((tmp_path / CONFIG_FILE).read_text())
    manifest["model"]["embed_dim"] = 64
    (tmp_path / CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match its content"):
        load_query_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_query_encoder(tmp_path / "nowhere")


def test_loaded_encoders_only_have_their_part(export_dir):
    with pytest.raises(RuntimeError, match="not 'query'"):
        load_doc_encoder(export_dir).encode_query(IMAGES)
    with pytest.raises(RuntimeError, match="not 'doc'"):
        load_query_encoder(export_dir).encode_doc(IMAGES)


def test_export_from_local_weights_needs_no_source_files(tokenizer, tmp_path):
    BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
        )
    ).save_pretrained(tmp_path / "bert")
    torch.save(RetrievalModel(ModelConfig()).image_encoder.net.state_dict(), tmp_path / "cnn.pth")
    config = ModelConfig(
        image=ImageEncoderConfig(pretrained_path=str(tmp_path / "cnn.pth")),
        text=TextEncoderConfig(pretrained_path=str(tmp_path / "bert")),
        preprocess=PreprocessConfig(image_size=32, max_text_length=16),
    )
    model = RetrievalModel(config).eval()
    export_model(model, tokenizer, tmp_path / "out")
    (tmp_path / "cnn.pth").unlink()
    for path in (tmp_path / "bert").iterdir():
        path.unlink()
    doc = load_doc_encoder(tmp_path / "out")
    assert doc.model.config.image.pretrained_path is None
    assert doc.model.text_encoder.dim == 32
    images, ids, mask = inputs(model, tokenizer)
    with torch.no_grad():
        assert torch.equal(doc.encode_doc(IMAGES, TEXTS), model.encode_doc(images, ids, mask))


def test_tokenizer_larger_than_the_embedding_table_is_refused(model, tmp_path):
    big = train_tokenizer([f"word{i} token{i}" for i in range(300)], vocab_size=400)
    with pytest.raises(ValueError, match="set text.vocab_size >= "):
        export_model(model, big, tmp_path)
