"""Small models for end-to-end tests: seconds per training step, milliseconds per query on a CPU."""

TINY_MODEL = {
    "image": {"name": "resnet10t"},
    "text": {
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 16,
    },
    "fusion": {"dim": 32, "num_heads": 2, "num_concepts": 2},
    "preprocess": {"image_size": 32, "max_text_length": 16},
    "embed_dim": 32,
}


def export_random_model(texts: list[str], out, seed: int = 0) -> str:
    """A small random-init model (tokenizer trained on ``texts``) exported as training exports
    it into ``out``; returns its model_version."""
    import torch

    from oclear_ray.config import ModelConfig, ShapeConfig, TextEncoderConfig
    from oclear_ray.export import export_model
    from oclear_ray.model import RetrievalModel
    from oclear_ray.preprocess import PreprocessConfig
    from oclear_ray.text import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=200)
    torch.manual_seed(seed)
    config = ModelConfig(
        text=TextEncoderConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            max_position_embeddings=16,
        ),
        preprocess=PreprocessConfig(image_size=32, max_text_length=16),
        shape=ShapeConfig(size=0),  # 32-wide vectors, as the served-index tests write them
        embed_dim=32,
    )
    return export_model(RetrievalModel(config).eval(), tokenizer, out)


#: the preprocessing the pretrained test backbone declares (unlike the ImageNet defaults)
BACKBONE_PREPROCESS = {
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.25, 0.3),
    "interpolation": "bilinear",
    "crop_pct": 0.9,
}


def save_pretrained_backbone(out, name: str = "resnet10t", seed: int = 0):
    """A random-init timm backbone saved as a pretrained one is published
    (``timm.models.save_for_hf``: ``config.json`` + ``model.safetensors``), declaring
    :data:`BACKBONE_PREPROCESS`; returns the model."""
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False)
    net.pretrained_cfg = {**net.pretrained_cfg, **BACKBONE_PREPROCESS}
    save_for_hf(net, str(out))
    return net


def save_pretrained_text(out, words: list[str], seed: int = 0):
    """A tiny random-init BERT and its WordPiece tokenizer (vocabulary: the special tokens and
    ``words``) saved with ``save_pretrained``; returns the tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(out))
    torch.manual_seed(seed)
    hf = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertModel(hf).save_pretrained(str(out))
    return tokenizer


#: the words of the pretrained test text model's vocabulary
PRETRAINED_WORDS = ["red", "mug", "blue", "cup", "steel", "bottle"]


def gpu_recipe_at_cpu_sizes(root) -> dict:
    """``configs/gpu.yaml`` at CPU sizes (bf16, ArcFace, Partial FC 0.1, augmentation, photo
    views of documents; 2 workers), started from the pretrained backbone and text model that
    :func:`save_pretrained_backbone` and :func:`save_pretrained_text` wrote under ``root``
    (``cnn`` and ``bert``)."""
    import yaml

    from tests.local_ray import REPO

    with open(REPO / "configs" / "gpu.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["model"] = {
        "image": {"pretrained": f"local-dir:{root / 'cnn'}"},
        "text": {"pretrained_path": str(root / "bert")},
        "fusion": {"dim": 32, "num_heads": 2, "num_concepts": 2},
        "preprocess": {"image_size": 32, "max_text_length": 16},
        "embed_dim": 32,
    }
    cfg["data"].update(batch_size=8, query_batch_size=4)
    cfg["run"].update(workers=2, cpus_per_worker=0.5, threads_per_worker=1, use_gpu=False)
    cfg["run"].update(checkpoint_every=100, max_failures=0)
    return cfg
