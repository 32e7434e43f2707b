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

    from oclear_ray.export import export_model
    from oclear_ray.model import ModelConfig, RetrievalModel, TextEncoderConfig
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
        embed_dim=32,
    )
    return export_model(RetrievalModel(config).eval(), tokenizer, out)
