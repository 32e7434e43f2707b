"""A model small enough for end-to-end tests that train (seconds per step on a CPU)."""

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
