"""The tiny hourglass model shared by the hierarchy, packing and input-hardening tests."""

import torch
from helpers_model import tiny_model

# Every mixer kind both inside the shortened span (layers 1-4) and outside it.
HOURGLASS_MODEL_KINDS = [
    "linear_attention",
    "full_attention",
    "sliding_attention",
    "linear_attention",
    "memory_attention",
    "sliding_attention",
    "full_attention",
]


def hourglass_model(k, seed=0, pooling="linear", upsampling="repeat", **overrides):
    """A tiny hourglass model whose upsampling (zero in a new model) is randomised, so the shortened path counts."""
    hierarchy = {"shorten_factor": k, "start_layer": 1, "end_layer": 5, "pooling": pooling, "upsampling": upsampling}
    kwargs = {
        "layer_types": HOURGLASS_MODEL_KINDS,
        "num_hidden_layers": len(HOURGLASS_MODEL_KINDS),
        "linear_feature_dim": 4,
        "hierarchy": hierarchy,
    }
    model = tiny_model("full", seed=seed, **{**kwargs, **overrides})
    with torch.no_grad():
        model.model.hourglass.upsample_proj.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed))
    return model
