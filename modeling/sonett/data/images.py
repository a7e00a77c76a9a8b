"""Embedded image-text data for Sonett's vision fusion: nothing is downloaded.

Two sources:

* **Shapes**: procedurally generated images with 1-3 shapes (circle, square, triangle) in four colours, each in
  its own cell of a 2x2 grid, with a caption and one-word question-answer pairs whose answers are right by
  construction. Rendering is deterministic for a seed; a held-out split is a different seed
  (`SHAPES_TRAIN_SEED` / `SHAPES_TEST_SEED`).
* **Digits**: the 8x8 handwritten digits that scikit-learn bundles (`sklearn.datasets.load_digits`), shipped with
  this package as `digits.npz` (see `DIGITS_FILE`), upscaled, with a deterministic stratified train/test split.

Examples are plain dicts with a PIL `image`, a `caption` and `questions` (a list of `(question, answer)` pairs);
`to_chat` turns one pair into a conversation in the format of Sonett's chat template.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from sonett.extras import requires_extra

with requires_extra("vision"):
    from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
# Cells of the 2x2 grid, in reading order, as (name, row, column).
CELLS: tuple[tuple[str, int, int], ...] = (
    ("top left", 0, 0),
    ("top right", 0, 1),
    ("bottom left", 1, 0),
    ("bottom right", 1, 1),
)
CELL_NAMES: tuple[str, ...] = tuple(name for name, _, _ in CELLS)
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

MAX_SHAPES = 3
# Per-channel colour jitter (+/-) of a shape and the range of the per-image dark grey background level.
COLOUR_JITTER = 20
BACKGROUND_LEVELS = (0, 60)

SHAPES_TRAIN_SEED = 1234
SHAPES_TEST_SEED = 98765

# Every answer a shapes question can have: counts, colours, kinds, "none", "yes", "no".
SHAPES_ANSWERS: tuple[str, ...] = (*COUNT_WORDS[1 : MAX_SHAPES + 1], *COLOURS, *SHAPE_KINDS, "none", "yes", "no")
DIGITS_QUESTION = "what digit is this?"
CAPTION_QUESTION = "describe the image."


class ShapeSpec(TypedDict):
    """One drawn shape: its kind, colour name, grid cell name, and pixel box (x0, y0, x1, y1), inclusive."""

    kind: str
    colour: str
    cell: str
    box: tuple[int, int, int, int]


def _join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def shapes_caption(shapes: list[ShapeSpec]) -> str:
    """A caption naming every shape in grid reading order, e.g. "a red circle at the top left and a blue
    square at the bottom right"."""
    ordered = sorted(shapes, key=lambda shape: CELL_NAMES.index(shape["cell"]))
    return _join_phrases([f"a {shape['colour']} {shape['kind']} at the {shape['cell']}" for shape in ordered])


def shapes_questions(shapes: list[ShapeSpec]) -> list[tuple[str, str]]:
    """All question-answer pairs for a set of shapes, in a fixed order; every answer is one word from
    `SHAPES_ANSWERS`.

    * "how many shapes?" -> "one" / "two" / "three"
    * "what colour is the <kind>?" for every kind that occurs exactly once -> colour
    * "what shape is at the <cell>?" for every cell -> kind or "none"
    * "is there a <colour> shape?" for every colour -> "yes" / "no"
    """
    questions = [("how many shapes?", COUNT_WORDS[len(shapes)])]
    for kind in SHAPE_KINDS:
        matching = [shape for shape in shapes if shape["kind"] == kind]
        if len(matching) == 1:
            questions.append((f"what colour is the {kind}?", matching[0]["colour"]))
    by_cell = {shape["cell"]: shape["kind"] for shape in shapes}
    for cell in CELL_NAMES:
        questions.append((f"what shape is at the {cell}?", by_cell.get(cell, "none")))
    colours = {shape["colour"] for shape in shapes}
    for colour in COLOURS:
        questions.append((f"is there a {colour} shape?", "yes" if colour in colours else "no"))
    return questions


QUESTION_TYPES: dict[str, str] = {
    "how many shapes?": "count",
    "what colour is the": "colour of a kind",
    "what shape is at the": "shape at a cell",
    "is there a": "colour present",
    DIGITS_QUESTION: "digit",
    CAPTION_QUESTION: "caption",
}


def question_type(question: str) -> str:
    """The kind of a question from `shapes_questions` or the digits question, e.g. "shape at a cell"."""
    for prefix, name in QUESTION_TYPES.items():
        if question.startswith(prefix):
            return name
    raise ValueError(f"not a question of the embedded data: {question!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def render_shapes_example(rng: np.random.Generator, image_size: int = 32) -> dict[str, Any]:
    """Draw one shapes image and derive its caption and questions.

    The image has 1-3 shapes, each in a different cell of a 2x2 grid, so shapes never overlap; each shape keeps
    a margin inside its cell, so it stays inside the image and apart from its neighbours. Kind, colour, size,
    position within the cell, a small per-channel colour jitter and a dark grey background level are all drawn
    from `rng`, so the same generator state always gives the same example.

    Args:
        rng: the random generator; it is advanced.
        image_size: side length in pixels (at least 16).

    Returns:
        `{"image": PIL RGB image, "caption": str, "questions": [(question, answer), ...],
        "shapes": [ShapeSpec, ...]}` with shapes in grid reading order.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    cell_size = image_size // 2
    margin = max(1, cell_size // 16)
    max_extent = cell_size - 2 * margin
    min_extent = max(5, cell_size // 2)

    background = int(rng.integers(BACKGROUND_LEVELS[0], BACKGROUND_LEVELS[1] + 1))
    image = Image.new("RGB", (image_size, image_size), (background,) * 3)
    draw = ImageDraw.Draw(image)

    count = int(rng.integers(1, MAX_SHAPES + 1))
    cell_indices = sorted(int(index) for index in rng.choice(len(CELLS), size=count, replace=False))
    shapes: list[ShapeSpec] = []
    for cell_index in cell_indices:
        cell_name, row, column = CELLS[cell_index]
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        extent = int(rng.integers(min_extent, max_extent + 1))
        slack = max_extent - extent
        x0 = column * cell_size + margin + int(rng.integers(0, slack + 1))
        y0 = row * cell_size + margin + int(rng.integers(0, slack + 1))
        box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = tuple(int(np.clip(base + delta, 0, 255)) for base, delta in zip(COLOURS[colour], jitter))
        _draw_shape(draw, kind, box, fill)
        shapes.append(ShapeSpec(kind=kind, colour=colour, cell=cell_name, box=box))

    return {
        "image": image,
        "caption": shapes_caption(shapes),
        "questions": shapes_questions(shapes),
        "shapes": shapes,
    }


def shapes_examples(count: int, seed: int, image_size: int = 32) -> list[dict[str, Any]]:
    """`count` shapes examples from one generator seeded with `seed` (see `render_shapes_example`).

    The same arguments always give the same examples, and a prefix of a longer list equals a shorter list.
    Use `SHAPES_TRAIN_SEED` and `SHAPES_TEST_SEED` for the standard train / held-out splits.
    """
    rng = np.random.default_rng(seed)
    examples = [render_shapes_example(rng, image_size) for _ in range(count)]
    logger.debug("rendered %d shapes examples (seed %d, %d px)", count, seed, image_size)
    return examples


# The 1797 8x8 handwritten digits (values 0..16) and their labels, as `sklearn.datasets.load_digits()` returns them
# (equal arrays, stored as uint8 with `numpy.savez_compressed`; 45 KB). Source: E. Alpaydin and C. Kaynak, "Optical
# Recognition of Handwritten Digits", UCI Machine Learning Repository (1998), https://doi.org/10.24432/C50P49,
# licensed CC BY 4.0; this is the test-set copy that scikit-learn bundles (BSD-3-Clause).
DIGITS_FILE = Path(__file__).with_name("digits.npz")


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits: images (1797, 8, 8) float64 in 0..16 and targets (1797,) int64, as scikit-learn's loader."""
    with np.load(DIGITS_FILE, allow_pickle=False) as data:
        return data["images"].astype(np.float64), data["targets"].astype(np.int64)


def digits_split_indices(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint, sorted train and test indices into `load_digits()`, stratified by class.

    Each class's indices are shuffled with a generator seeded by `seed`, and the first
    `round(test_fraction * class_size)` of them go to the test split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    _, targets = _load_digits()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(len(DIGIT_NAMES)):
        indices = rng.permutation(np.flatnonzero(targets == label))
        n_test = round(test_fraction * len(indices))
        test.append(indices[:n_test])
        train.append(indices[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digits_examples(
    split: str, seed: int = 0, image_size: int = 32, test_fraction: float = 0.2
) -> list[dict[str, Any]]:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, bundled, no download) as examples.

    Each 8x8 image (values 0..16) is scaled to uint8 (0..255), resized bilinearly to `image_size` and returned as
    an RGB image (grey replicated over the channels, like the shapes images).

    Args:
        split: "train" or "test"; the two are disjoint and stratified by class (see `digits_split_indices`).
        seed: seed of the split.
        image_size: side length of the returned images.
        test_fraction: fraction of each class that goes to the test split.

    Returns:
        Examples in dataset order: `{"image", "label": int, "index": int (position in load_digits()),
        "caption": "the digit seven", "questions": [("what digit is this?", "seven")]}`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, targets = _load_digits()
    train, test = digits_split_indices(seed, test_fraction)
    indices = train if split == "train" else test
    examples = []
    for index in indices:
        pixels = np.clip(np.rint(images[index] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR)
        label = int(targets[index])
        name = DIGIT_NAMES[label]
        examples.append(
            {
                "image": image.convert("RGB"),
                "label": label,
                "index": int(index),
                "caption": f"the digit {name}",
                "questions": [(DIGITS_QUESTION, name)],
            }
        )
    logger.debug("digits %s split: %d examples (seed %d)", split, len(examples), seed)
    return examples


def to_chat(example: dict[str, Any], question: str, answer: str) -> list[dict[str, Any]]:
    """One question about `example`'s image and its answer as a conversation for Sonett's chat template.

    The user turn holds an image part (rendered as the image token) followed by the question; the assistant
    turn holds the answer, so `return_assistant_tokens_mask` marks just the answer. The image itself stays in
    `example["image"]`; pass it to the image processor alongside the conversation.
    """
    if "image" not in example:
        raise ValueError("example has no image")
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def qa_records(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten examples into one record per question: `{"image", "question", "answer", "messages"}`, where
    `messages` is `to_chat(example, question, answer)`."""
    return [
        {
            "image": example["image"],
            "question": question,
            "answer": answer,
            "messages": to_chat(example, question, answer),
        }
        for example in examples
        for question, answer in example["questions"]
    ]


__all__ = [
    "CAPTION_QUESTION",
    "CELL_NAMES",
    "COLOURS",
    "DIGITS_QUESTION",
    "DIGIT_NAMES",
    "QUESTION_TYPES",
    "SHAPES_ANSWERS",
    "SHAPES_TEST_SEED",
    "SHAPES_TRAIN_SEED",
    "SHAPE_KINDS",
    "ShapeSpec",
    "digits_examples",
    "digits_split_indices",
    "qa_records",
    "question_type",
    "render_shapes_example",
    "shapes_caption",
    "shapes_examples",
    "shapes_questions",
    "to_chat",
]
