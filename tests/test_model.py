"""Encoders and concept-aware fusion: shapes, norms, the empty-text path, the gate, sharing."""

import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from oclear_ray.config import (
    FusionConfig,
    ImageEncoderConfig,
    ModelConfig,
    ShapeConfig,
    TextEncoderConfig,
)
from oclear_ray.model import ImageEncoder, LevelView, RetrievalModel, TextEncoder
from oclear_ray.preprocess import PreprocessConfig

B, T, VOCAB = 3, 12, 100


def small_config(**image) -> ModelConfig:
    return ModelConfig(
        image=ImageEncoderConfig(**image),
        text=TextEncoderConfig(vocab_size=VOCAB, max_position_embeddings=32),
        preprocess=PreprocessConfig(image_size=32, max_text_length=T),
        shape=ShapeConfig(size=0),  # the learned part alone (test_shape.py has the shape code)
    )


@pytest.fixture(scope="module")
def model() -> RetrievalModel:
    torch.manual_seed(0)
    return RetrievalModel(small_config()).eval()


@pytest.fixture(scope="module")
def batch():
    """Images, ids and mask for three rows: full text, empty text, short text."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 32, 32, generator=gen)
    ids = torch.randint(5, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1] = 0
    mask[2, 4:] = 0
    return images, ids * mask, mask


def assert_unit_rows(emb: torch.Tensor) -> None:
    assert emb.shape == (B, 128)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B), atol=1e-5, rtol=0)


@torch.no_grad()
def test_doc_and_query_embeddings_are_unit_vectors(model, batch):
    images, ids, mask = batch
    assert_unit_rows(model.encode_doc(images, ids, mask))
    assert_unit_rows(model.encode_doc(images))
    assert_unit_rows(model.encode_query(images))
    assert_unit_rows(model.encode_query(images, ids, mask))
    assert_unit_rows(model.encode_query(input_ids=ids[[0, 2, 0]], attention_mask=mask[[0, 2, 0]]))


@torch.no_grad()
def test_gate_is_exposed_in_unit_interval_and_one_without_text(model, batch):
    images, ids, mask = batch
    emb, gate = model.encode_doc(images, ids, mask, return_gate=True)
    assert gate.shape == (B,)
    assert ((gate >= 0) & (gate <= 1)).all()
    assert gate[1] == 1.0 and gate[0] < 1.0 and gate[2] < 1.0
    assert torch.equal(model.encode_query(images, return_gate=True)[1], torch.ones(B))
    text_only = model.encode_query(input_ids=ids[[0]], attention_mask=mask[[0]], return_gate=True)
    assert torch.equal(text_only[1], torch.zeros(1))


@torch.no_grad()
def test_empty_text_doc_is_its_image_embedding(model, batch):
    images, ids, mask = batch
    fused = model.encode_doc(images, ids, mask)
    image_only = model.encode_doc(images)
    assert torch.equal(fused[1], image_only[1])
    assert not torch.allclose(fused[0], image_only[0], atol=1e-3)


def test_empty_text_doc_does_not_depend_on_text_tower(batch):
    images, ids, mask = batch
    torch.manual_seed(0)
    model = RetrievalModel(small_config()).eval()
    with torch.no_grad():
        before = model.encode_doc(images, ids, mask)
        for param in [*model.text_encoder.parameters(), *model.fusion.parameters()]:
            param.add_(torch.randn_like(param))
        after = model.encode_doc(images, ids, mask)
    assert torch.equal(before[1], after[1])
    assert not torch.allclose(before[0], after[0], atol=1e-3)


def test_all_empty_text_batch_trains_without_nan(batch):
    images, ids, _ = batch
    model = RetrievalModel(small_config())
    empty = torch.zeros(B, T, dtype=torch.long)
    emb = model.encode_doc(images, torch.zeros_like(ids), empty)
    emb.sum().backward()
    assert torch.isfinite(emb).all()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_query_without_inputs_is_a_clear_error(model, batch):
    with pytest.raises(ValueError, match="needs images, input_ids"):
        model.encode_query()
    _, ids, mask = batch
    with pytest.raises(ValueError, match=r"rows \[1\] have no text"):
        model.encode_query(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask is required"):
        model.encode_query(input_ids=ids)


@torch.no_grad()
def test_backbone_is_shared_and_heads_differ(model, batch):
    images, _, _ = batch
    calls = []
    hook = model.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    doc, query = model.encode_doc(images), model.encode_query(images)
    hook.remove()
    assert len(calls) == 2
    assert model.doc_image_head is not model.query_image_head
    doc_weights = {p.data_ptr() for p in model.doc_image_head.parameters()}
    assert doc_weights.isdisjoint(p.data_ptr() for p in model.query_image_head.parameters())
    assert not torch.allclose(doc, query, atol=1e-3)
    assert [m for m in model.modules() if isinstance(m, ImageEncoder)] == [model.image_encoder]


def test_parts_restrict_the_heads():
    doc_only = RetrievalModel(small_config(), parts=("doc",))
    assert doc_only.query_image_head is None and doc_only.query_text_head is None
    with pytest.raises(RuntimeError, match="parts=\\('doc',\\)"):
        doc_only.encode_query(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="'photo'"):
        RetrievalModel(small_config(), parts=("photo",))


def test_shard_units_are_submodules_in_forward_order(model):
    units = model.shard_units()
    modules = list(model.modules())
    assert all(any(u is m for m in modules) for u in units)
    assert units[-1] is model.fusion
    assert units[-3:-1] == model.text_encoder.blocks() and len(model.text_encoder.blocks()) == 2
    net = model.image_encoder.net  # resnet10t, the default
    assert model.image_encoder.blocks() == [net.layer1, net.layer2, net.layer3, net.layer4]


def test_spatial_tokens_for_cnn_and_vit():
    cnn = ImageEncoder(ImageEncoderConfig(name="resnet10t"))
    pooled, tokens = cnn(torch.randn(2, 3, 64, 64))
    assert pooled.shape == (2, 512) and tokens.shape == (2, 4, 512)
    vit_kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
    vit = ImageEncoder(ImageEncoderConfig(name="vit_tiny_patch16_224", model_kwargs=vit_kwargs))
    pooled, tokens = vit(torch.randn(2, 3, 32, 32))
    assert pooled.shape == (2, 192) and tokens.shape == (2, 16, 192)  # class token dropped


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_loads_local_timm_weights(tmp_path, suffix):
    source = timm.create_model("resnet10t", pretrained=False, num_classes=7)  # with a classifier
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    encoder = ImageEncoder(ImageEncoderConfig(name="resnet10t", pretrained_path=str(path)))
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    loaded = encoder.net.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_backbone_rejects_weights_of_another_model(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("regnetx_002", num_classes=0).state_dict(), path)
    with pytest.raises(ValueError, match="do not match the backbone: missing"):
        ImageEncoder(ImageEncoderConfig(name="resnet10t", pretrained_path=str(path)))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ImageEncoder(
            ImageEncoderConfig(name="resnet10t", pretrained_path=str(tmp_path / "missing.pth"))
        )


def test_text_tower_loads_save_pretrained_folder(tmp_path):
    hf = BertConfig(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=96,
        max_position_embeddings=16,
    )
    source = BertModel(hf)
    source.save_pretrained(tmp_path)
    encoder = TextEncoder(TextEncoderConfig(pretrained_path=str(tmp_path)))
    assert encoder.dim == 64 and encoder.model.pooler is None
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("pooler.")}
    loaded = encoder.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    tokens, mask, pooled = encoder(torch.tensor([[2, 7, 3, 0]]), torch.tensor([[1, 1, 1, 0]]))
    assert tokens.shape == (1, 4, 64) and pooled.shape == (1, 64)
    torch.testing.assert_close(pooled, tokens[:, :3].mean(1))


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="'no_such_net'"):
        ImageEncoderConfig(name="no_such_net")
    with pytest.raises(ValueError, match="fusion.dim 100 .* fusion.num_heads 3"):
        FusionConfig(dim=100, num_heads=3)
    with pytest.raises(ValueError, match="text.hidden_size 130"):
        TextEncoderConfig(hidden_size=130, num_heads=4)
    with pytest.raises(ValueError, match="max_text_length 128 exceeds .* 64"):
        ModelConfig(preprocess=PreprocessConfig(max_text_length=128))
    with pytest.raises(ValueError, match="embed_dim must be >= 1, got 0"):
        ModelConfig(embed_dim=0)


def test_config_round_trips_through_plain_dicts():
    config = ModelConfig(
        image=ImageEncoderConfig(name="regnetx_002", model_kwargs={"drop_path_rate": 0.1}),
        fusion=FusionConfig(num_concepts=4),
        embed_dim=64,
    )
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_slots'\] in model.fusion"):
        ModelConfig.from_dict({"fusion": {"num_slots": 4}})


@torch.no_grad()
def test_encode_pair_matches_the_encode_methods(model, batch):
    images, ids, mask = batch
    doc, fused, query, text = model.encode_pair(images, images.flip(0), ids, mask)
    torch.testing.assert_close(doc, model.encode_doc(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(fused, model.encode_doc(images, ids, mask), atol=1e-6, rtol=0)
    has_text = mask.bool().any(1)
    torch.testing.assert_close(
        text[has_text],
        model.encode_query(input_ids=ids[has_text], attention_mask=mask[has_text]),
        atol=1e-6,
        rtol=0,
    )
    image_only = model.encode_pair(images, images, None, None)
    assert image_only.fused is None and image_only.text is None
    torch.testing.assert_close(query, model.encode_query(images.flip(0)), atol=1e-6, rtol=0)


def test_the_level_view_shows_a_colour_drawing_as_its_line_art():
    """On ink levels a black outline filled with colour and the bare outline look the same to
    the backbone (its three channels alike); on grey levels the fill shows; rgb is as is."""
    pre = PreprocessConfig(image_size=8)
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    line_art = torch.ones(1, 3, 8, 8)
    line_art[..., 2:6, 2:6] = 0  # a black square's outline
    line_art[..., 3:5, 3:5] = 1
    drawing = line_art.clone()
    drawing[:, :, 3:5, 3:5] = torch.tensor([1.0, 0.2, 0.1]).view(1, 3, 1, 1)  # a red fill
    line_art, drawing = (line_art - mean) / std, (drawing - mean) / std
    ink = LevelView("ink", pre)
    torch.testing.assert_close(ink(drawing), ink(line_art))
    torch.testing.assert_close(ink(line_art), line_art)  # black on white: already its own ink
    grey = LevelView("grey", pre)(drawing) * std + mean
    torch.testing.assert_close(grey[:, 0], grey[:, 2])
    assert 0.3 < grey[0, 0, 3, 3] < 0.5  # luma of the fill
    assert LevelView("rgb", pre)(drawing) is drawing


def test_the_backbone_sees_the_configured_levels():
    torch.manual_seed(0)
    model = RetrievalModel(small_config(levels="ink")).eval()
    images = torch.randn(2, 3, 32, 32)
    pre = model.config.preprocess
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    pixels = (images * std + mean).amax(1, keepdim=True).expand(-1, 3, -1, -1)  # its ink, grey
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_query(images), model.encode_query((pixels - mean) / std)
        )
