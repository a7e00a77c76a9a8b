"""Tiny multimodal Sonett models and inputs shared by the vision, packing, compilation and input tests."""

import torch
from helpers_model import random_ids, tiny_model

from sonett import SonettForConditionalGeneration

IMAGE = 3
VISION = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
CROSS_LAYERS = [0, 2]


def multimodal(seed=0, open_gates=True, **vision):
    """A tiny multimodal model built from a text model; gates opened so the images count."""
    text = tiny_model("mixed", seed=seed)
    model = SonettForConditionalGeneration.from_text_model(
        text, cross_attention_layers=CROSS_LAYERS, vision_config={**VISION, **vision}, image_token_id=IMAGE
    ).eval()
    if open_gates:
        with torch.no_grad():
            for block in model.model.cross_attention_blocks.values():
                block.attn_gate.fill_(1.0)
                block.mlp_gate.fill_(1.0)
    return text, model


def prompt(batch=2, length=10, markers=((2, 6), (2, 7)), seed=1):
    """Token ids with image markers at the given positions per row."""
    ids = random_ids(batch, length, seed=seed, low=6)
    for row, positions in enumerate(markers):
        for position in positions:
            ids[row, position] = IMAGE
    return ids


def pixels(batch=2, images=2, seed=2):
    """Random pixel values (batch, images, 3, 16, 16) for the VISION encoder."""
    return torch.randn(batch, images, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def vlm(seed=0):
    """A tiny multimodal model with one cross-attention block (layer 1), as `from_text_model` builds it."""
    text = tiny_model("mixed", seed=seed)
    return SonettForConditionalGeneration.from_text_model(
        text, cross_attention_layers=[1], vision_config=VISION, image_token_id=IMAGE
    ).eval()
