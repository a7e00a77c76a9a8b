"""Stage 1 of the vision recipe: the annotation targets, the per-cell pooling of the head, the loss over the
targets a batch has, and a short pretraining run that learns the held-out annotations of an easy split."""

import random

import pytest
import torch
import torch.nn.functional as F

from sonett.data.images import SHAPES_TEST_SEED, SHAPES_TRAIN_SEED, digits_examples, shapes_examples
from sonett.model.configuration_sonett import SonettVisionConfig
from sonett.model.image_processing_sonett import SonettImageProcessor
from sonett.model.vision_sonett import SonettVisionModel
from sonett.training.vision_encoder import (
    CELL_COLOURS,
    CELL_KINDS,
    IGNORE,
    EncoderPretrainingModel,
    annotation_accuracy,
    encoder_targets,
    pretrain_encoder,
    stack_targets,
)


def encoder(**overrides) -> SonettVisionModel:
    torch.manual_seed(0)
    settings = {"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    return SonettVisionModel(SonettVisionConfig(**{**settings, **overrides}))


def test_targets_follow_the_drawn_shapes_and_the_digit_label():
    example = shapes_examples(1, SHAPES_TEST_SEED)[0]
    targets = encoder_targets(example)
    cells = ["top left", "top right", "bottom left", "bottom right"]
    expected_kinds, expected_colours = ["none"] * 4, ["none"] * 4
    for shape in example["shapes"]:
        expected_kinds[cells.index(shape["cell"])] = shape["kind"]
        expected_colours[cells.index(shape["cell"])] = shape["colour"]
    assert [CELL_KINDS[i] for i in targets["kinds"]] == expected_kinds
    assert [CELL_COLOURS[i] for i in targets["colours"]] == expected_colours
    assert int(targets["digit"]) == IGNORE

    digit = digits_examples("test")[0]
    targets = encoder_targets(digit)
    assert int(targets["digit"]) == digit["label"]
    assert (targets["kinds"] == IGNORE).all() and (targets["colours"] == IGNORE).all()
    with pytest.raises(ValueError, match="neither 'shapes' nor 'label'"):
        encoder_targets({"image": digit["image"]})


def test_every_patch_gets_the_labels_of_its_cell():
    model = EncoderPretrainingModel(encoder())  # 16 px, patch 4: a 4x4 grid, 2x2 patches per cell
    expected = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert model.patch_cells().tolist() == [cell for row in expected for cell in row]

    logits = model(torch.randn(2, 3, 16, 16))
    assert logits["digit"].shape == (2, 10) and set(logits) == {"digit", "kinds", "colours"}
    assert logits["kinds"].shape == (2, 16, len(CELL_KINDS)) and logits["colours"].shape == (2, 16, len(CELL_COLOURS))

    # A cell's logits are the mean of its four patches' logits.
    cells = model.cell_logits(logits)
    top_right = [2, 3, 6, 7]
    assert torch.allclose(cells["kinds"][:, 1], logits["kinds"][:, top_right].mean(1), atol=1e-6)
    assert torch.allclose(cells["colours"][:, 1], logits["colours"][:, top_right].mean(1), atol=1e-6)


def test_the_loss_counts_only_the_targets_a_batch_has():
    model = EncoderPretrainingModel(encoder())
    logits = {"digit": torch.randn(2, 10), "kinds": torch.randn(2, 16, 4), "colours": torch.randn(2, 16, 5)}
    cells = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
    digits_only = {
        "digit": torch.tensor([3, 7]),
        "kinds": torch.full((2, 4), IGNORE),
        "colours": torch.full((2, 4), IGNORE),
    }
    expected = F.cross_entropy(logits["digit"], digits_only["digit"])
    assert torch.allclose(model.loss(logits, digits_only), expected)

    mixed = {
        "digit": torch.tensor([3, IGNORE]),
        "kinds": torch.tensor([[IGNORE] * 4, [0, 1, 2, 3]]),
        "colours": torch.tensor([[IGNORE] * 4, [0, 4, 1, 0]]),
    }
    expected = (
        F.cross_entropy(logits["digit"][:1], mixed["digit"][:1])
        + F.cross_entropy(logits["kinds"][1], mixed["kinds"][1][cells])
        + F.cross_entropy(logits["colours"][1], mixed["colours"][1][cells])
    )
    assert torch.allclose(model.loss(logits, mixed), expected)


def test_a_short_run_learns_the_held_out_colours():
    """Colour is visible in any single patch, so a few dozen steps must take the held-out colour accuracy far above
    chance (1 in 5): the stage really trains the encoder and the head."""
    processor = SonettImageProcessor(size={"height": 16, "width": 16})
    train, test = shapes_examples(200, SHAPES_TRAIN_SEED, 16), shapes_examples(40, SHAPES_TEST_SEED, 16)

    def pixels(examples):
        return processor([e["image"] for e in examples], return_tensors="pt")["pixel_values"]

    def sample_batch(rng):
        batch = rng.sample(train, 32)
        return pixels(batch), stack_targets(batch)

    model = EncoderPretrainingModel(encoder(stem="convolutional"))
    before = annotation_accuracy(model, pixels(test), stack_targets(test))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    weights = model.encoder.patch_embedding.weight.detach().clone()
    history = pretrain_encoder(
        model,
        optimizer,
        scheduler,
        sample_batch,
        steps=60,
        rng=random.Random(0),
        backward=lambda loss: loss.backward(),
        clip=lambda: None,
        device=torch.device("cpu"),
    )
    after = annotation_accuracy(model, pixels(test), stack_targets(test))
    assert len(history) == 60 and sum(history[-10:]) < sum(history[:10])
    assert not torch.equal(model.encoder.patch_embedding.weight, weights)
    assert after["colours"] >= 0.9 > before["colours"], (before, after)
    assert set(after) == {"kinds", "colours"}  # no digits in this split
