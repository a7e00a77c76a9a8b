"""Stage 1 of the vision recipe: supervised pretraining of the ViT encoder on the embedded images' annotations.

Real vision-language models start from an encoder that already sees (CLIP, SigLIP); none can be downloaded here,
so the recipe first trains Sonett's own encoder as a classifier of what the generated data knows about each
image: the digit's class, and for the shapes images the kind and colour of whatever sits in each cell of the
2x2 grid ("none" for an empty cell). A linear head reads the digit from the mean of all patch features, and from
every single patch the kind and colour of the cell it lies in, so that each visual token the text model later
attends to carries what its part of the image shows. The head is thrown away afterwards; only the encoder's
weights carry over into the fusion stage.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sonett.data.images import CELL_NAMES, COLOURS, DIGIT_NAMES, SHAPE_KINDS
from sonett.model.vision_sonett import SonettVisionModel

logger = logging.getLogger(__name__)

IGNORE = -100
CELL_KINDS = ("none", *SHAPE_KINDS)
CELL_COLOURS = ("none", *COLOURS)


def encoder_targets(example: dict) -> dict[str, torch.Tensor]:
    """The annotation targets of one example from `sonett.data.images`.

    Returns `{"digit": () long, "kinds": (4,) long, "colours": (4,) long}` indexing `DIGIT_NAMES`, `CELL_KINDS`
    and `CELL_COLOURS`; the fields an example does not have are `IGNORE` (a digit has no cells, a shapes image no
    digit).
    """
    kinds = torch.full((len(CELL_NAMES),), IGNORE)
    colours = torch.full((len(CELL_NAMES),), IGNORE)
    digit = torch.tensor(IGNORE)
    if "shapes" in example:
        kinds.zero_()
        colours.zero_()
        for shape in example["shapes"]:
            cell = CELL_NAMES.index(shape["cell"])
            kinds[cell] = CELL_KINDS.index(shape["kind"])
            colours[cell] = CELL_COLOURS.index(shape["colour"])
    elif "label" in example:
        digit = torch.tensor(int(example["label"]))
    else:
        raise ValueError("example has neither 'shapes' nor 'label' annotations")
    return {"digit": digit, "kinds": kinds, "colours": colours}


class EncoderPretrainingModel(nn.Module):
    """The encoder plus a linear head over pooled patch features for the annotation targets."""

    def __init__(self, encoder: SonettVisionModel) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.digit_head = nn.Linear(hidden, len(DIGIT_NAMES))
        self.patch_head = nn.Linear(hidden, len(CELL_KINDS) + len(CELL_COLOURS))

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixel_values `(images, 3, H, W)` -> logits `digit (images, 10)`, and per patch `kinds (images, patches,
        4)` and `colours (images, patches, 5)` of the cell the patch lies in."""
        features = self.encoder(pixel_values)  # (images, grid * grid, hidden)
        patch_logits = self.patch_head(features)
        return {
            "digit": self.digit_head(features.mean(1)),
            "kinds": patch_logits[..., : len(CELL_KINDS)],
            "colours": patch_logits[..., len(CELL_KINDS) :],
        }

    def patch_cells(self) -> torch.Tensor:
        """`(patches,)` long: the grid cell (index into `CELL_NAMES`) each patch's centre lies in."""
        grid = self.encoder.grid
        half = torch.arange(grid) * 2 + 1 >= grid  # patch centre in the lower / right half
        return (half[:, None].long() * 2 + half[None, :].long()).flatten()

    def loss(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the mean cross-entropies of the targets present in the batch: the digit per image, and per patch
        the kind and colour of its cell. `targets` are per image and cell (`stack_targets`)."""
        cells = self.patch_cells().to(logits["digit"].device)
        dense = {
            "digit": targets["digit"],
            "kinds": targets["kinds"][:, cells],  # (images, patches)
            "colours": targets["colours"][:, cells],
        }
        total = logits["digit"].new_zeros(())
        for name, target in dense.items():
            target = target.reshape(-1)
            if (target != IGNORE).any():
                total = total + F.cross_entropy(logits[name].reshape(target.shape[0], -1), target, ignore_index=IGNORE)
        return total

    def cell_logits(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-patch `kinds` and `colours` logits averaged over each cell's patches: `(images, 4, classes)`."""
        cells = self.patch_cells().to(logits["kinds"].device)
        one_hot = F.one_hot(cells, len(CELL_NAMES)).to(logits["kinds"].dtype)  # (patches, 4)
        weights = one_hot / one_hot.sum(0)
        return {name: torch.einsum("ipc,pk->ikc", logits[name], weights) for name in ("kinds", "colours")}


def stack_targets(examples: list[dict]) -> dict[str, torch.Tensor]:
    """`encoder_targets` of each example, stacked along a new first dimension."""
    targets = [encoder_targets(example) for example in examples]
    return {name: torch.stack([t[name] for t in targets]) for name in ("digit", "kinds", "colours")}


@torch.no_grad()
def annotation_accuracy(
    model: EncoderPretrainingModel, pixel_values: torch.Tensor, targets: dict[str, torch.Tensor], batch_size: int = 256
) -> dict[str, float]:
    """Accuracy of the head on each annotation (over the entries that are not `IGNORE`); a cell's kind and colour
    are read from its patches' mean logits."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = {name: 0 for name in targets}
    counts = {name: int((targets[name] != IGNORE).sum()) for name in targets}
    for start in range(0, pixel_values.shape[0], batch_size):
        logits = model(pixel_values[start : start + batch_size].to(device))
        logits = {"digit": logits["digit"], **model.cell_logits(logits)}
        for name in targets:
            target = targets[name][start : start + batch_size].to(device)
            hits[name] += int(((logits[name].argmax(-1) == target) & (target != IGNORE)).sum())
    model.train(was_training)
    return {name: hits[name] / counts[name] for name in targets if counts[name]}


def pretrain_encoder(
    model: EncoderPretrainingModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sample_batch: Callable[[random.Random], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    steps: int,
    rng: random.Random,
    backward: Callable[[torch.Tensor], None],
    clip: Callable[[], None],
    device: torch.device,
) -> list[float]:
    """Run `steps` optimisation steps on batches from `sample_batch(rng)`; returns the losses.

    `backward` and `clip` come from the caller's Accelerator, so the stage runs under the same launch (processes,
    precision) as the fusion stage.
    """
    unwrapped = getattr(model, "module", model)  # under DistributedDataParallel
    model.train()
    history = []
    for _ in range(steps):
        pixel_values, targets = sample_batch(rng)
        logits = model(pixel_values.to(device))
        loss = unwrapped.loss(logits, {name: t.to(device) for name, t in targets.items()})
        backward(loss)
        clip()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        history.append(float(loss.detach()))
    return history


__all__ = [
    "CELL_COLOURS",
    "CELL_KINDS",
    "EncoderPretrainingModel",
    "annotation_accuracy",
    "encoder_targets",
    "pretrain_encoder",
    "stack_targets",
]
