"""Embedded vision data: shapes answers re-derived from pixels, digits split, held-out disjointness, chat format."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from sonett.data.images import (
    COLOURS,
    DIGIT_NAMES,
    DIGITS_FILE,
    SHAPES_ANSWERS,
    SHAPES_TEST_SEED,
    SHAPES_TRAIN_SEED,
    digits_examples,
    qa_records,
    question_type,
    render_shapes_example,
    shapes_examples,
    to_chat,
)
from sonett.data.tokenizer import IMAGE_TOKEN, train_bpe_tokenizer

N_TRAIN, N_TEST = 2000, 400


@pytest.fixture(scope="module")
def shapes_train():
    return shapes_examples(N_TRAIN, SHAPES_TRAIN_SEED)


@pytest.fixture(scope="module")
def shapes_test():
    return shapes_examples(N_TEST, SHAPES_TEST_SEED)


@pytest.fixture(scope="module")
def digits():
    return digits_examples("train"), digits_examples("test")


def load_digits():
    """The shipped digits as scikit-learn's `load_digits()` gives them (equal: tests/data/test_digits_data.py)."""
    with np.load(DIGITS_FILE) as data:
        return SimpleNamespace(images=data["images"].astype(np.float64), target=data["targets"].astype(np.int64))


def pixels(image):
    return np.asarray(image).astype(np.int64)


def blobs_from_pixels(image):
    """Shapes seen in the image alone: connected non-background blobs, classified by how much of their
    bounding box they fill, coloured by the nearest palette colour, placed by the grid cell that holds them."""
    array = pixels(image)
    height, width, _ = array.shape
    background = array[0, 0]
    assert (array[0, :] == background).all() and (array[:, 0] == background).all()
    mask = (array != background).any(axis=-1)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    found = []
    for number, box in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[box] == number
        fill = blob.sum() / blob.size
        kind = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
        mean = array[box][blob].mean(axis=0)
        colour = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - mean).sum())
        assert np.abs(np.array(COLOURS[colour]) - mean).sum() < 70, "blob colour is far from every palette colour"
        rows, columns = box
        half_h, half_w = height // 2, width // 2
        # The blob lies wholly inside one cell of the 2x2 grid.
        assert rows.stop <= half_h or rows.start >= half_h
        assert columns.stop <= half_w or columns.start >= half_w
        vertical = "top" if rows.start < half_h else "bottom"
        horizontal = "left" if columns.start < half_w else "right"
        found.append({"kind": kind, "colour": colour, "cell": f"{vertical} {horizontal}"})
    assert count == len(found)
    return found


def answer_from_blobs(question, blobs):
    """Answer a shapes question from pixel-derived blobs, independently of the library's own logic."""
    if question == "how many shapes?":
        return ["zero", "one", "two", "three"][len(blobs)]
    if match := re.fullmatch(r"what colour is the (\w+)\?", question):
        (blob,) = [blob for blob in blobs if blob["kind"] == match[1]]
        return blob["colour"]
    if match := re.fullmatch(r"what shape is at the (top|bottom) (left|right)\?", question):
        kinds = [blob["kind"] for blob in blobs if blob["cell"] == f"{match[1]} {match[2]}"]
        return kinds[0] if kinds else "none"
    if match := re.fullmatch(r"is there a (\w+) shape\?", question):
        return "yes" if any(blob["colour"] == match[1] for blob in blobs) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_shapes_are_deterministic_for_a_seed():
    first, second = shapes_examples(50, 7), shapes_examples(50, 7)
    for a, b in zip(first, second):
        assert a["image"].tobytes() == b["image"].tobytes()
        assert (a["caption"], a["questions"], a["shapes"]) == (b["caption"], b["questions"], b["shapes"])
    longer = shapes_examples(60, 7)
    assert [e["image"].tobytes() for e in longer[:50]] == [e["image"].tobytes() for e in first]
    other = shapes_examples(50, 8)
    assert [e["image"].tobytes() for e in other] != [e["image"].tobytes() for e in first]
    again = render_shapes_example(np.random.default_rng(3))
    assert again["image"].tobytes() == render_shapes_example(np.random.default_rng(3))["image"].tobytes()


def test_every_shapes_answer_matches_the_pixels(shapes_train, shapes_test):
    for example in shapes_train[:600] + shapes_test:
        image = example["image"]
        assert image.mode == "RGB" and image.size == (32, 32)
        blobs = blobs_from_pixels(image)
        assert 1 <= len(blobs) <= 3
        key = lambda shape: shape["cell"]  # noqa: E731
        assert sorted(blobs, key=key) == sorted(
            ({k: s[k] for k in ("kind", "colour", "cell")} for s in example["shapes"]), key=key
        )
        asked = [question for question, _ in example["questions"]]
        assert len(asked) == len(set(asked))
        assert "how many shapes?" in asked
        assert sum(q.startswith("what shape is at") for q in asked) == 4
        assert sum(q.startswith("is there a") for q in asked) == 4
        for question, answer in example["questions"]:
            assert answer in SHAPES_ANSWERS
            assert answer == answer_from_blobs(question, blobs), (question, answer, blobs)


def test_colour_question_only_for_a_unique_kind(shapes_train):
    asked_about_circle = 0
    for example in shapes_train:
        circles = [s for s in example["shapes"] if s["kind"] == "circle"]
        asked = dict(example["questions"])
        assert ("what colour is the circle?" in asked) == (len(circles) == 1)
        asked_about_circle += len(circles) == 1
    assert asked_about_circle > N_TRAIN // 5


def test_captions_mention_every_shape(shapes_train):
    for example in shapes_train[:500]:
        caption = example["caption"]
        for shape in example["shapes"]:
            assert f"a {shape['colour']} {shape['kind']} at the {shape['cell']}" in caption
        assert caption.count(" at the ") == len(example["shapes"])
    two = next(e for e in shapes_train if len(e["shapes"]) == 2)
    assert re.fullmatch(r"a \w+ \w+ at the \w+ \w+ and a \w+ \w+ at the \w+ \w+", two["caption"])


def test_shapes_cover_the_answer_space(shapes_train):
    answers = {answer for example in shapes_train for _, answer in example["questions"]}
    assert answers == set(SHAPES_ANSWERS)
    counts = np.bincount([len(e["shapes"]) for e in shapes_train], minlength=4)
    assert counts[0] == 0 and min(counts[1:]) > N_TRAIN // 5


def test_every_question_has_its_type(shapes_train):
    types = {}
    for example in shapes_train[:50]:
        for question, answer in example["questions"]:
            types.setdefault(question_type(question), set()).add(answer)
    assert types["count"] == {"one", "two", "three"}
    assert types["colour of a kind"] == set(COLOURS)
    assert types["shape at a cell"] == {"circle", "square", "triangle", "none"}
    assert types["colour present"] == {"yes", "no"}
    assert question_type("what digit is this?") == "digit"
    assert question_type("describe the image.") == "caption"
    with pytest.raises(ValueError, match="not a question of the embedded data"):
        question_type("what is the capital of France?")


def test_held_out_shapes_are_not_training_images(shapes_train, shapes_test):
    train_images = {example["image"].tobytes() for example in shapes_train}
    assert len(train_images) == N_TRAIN
    assert not train_images.intersection(example["image"].tobytes() for example in shapes_test)


def test_shapes_at_another_size():
    for example in shapes_examples(40, 5, image_size=64):
        assert example["image"].size == (64, 64)
        blobs = blobs_from_pixels(example["image"])
        for question, answer in example["questions"]:
            assert answer == answer_from_blobs(question, blobs)


def test_digits_split_is_stratified_disjoint_and_deterministic(digits):
    train, test = digits
    targets = load_digits().target
    assert len(train) + len(test) == len(targets)
    train_indices = {e["index"] for e in train}
    test_indices = {e["index"] for e in test}
    assert not train_indices & test_indices
    assert train_indices | test_indices == set(range(len(targets)))
    for label in range(10):
        in_class = int((targets == label).sum())
        assert sum(e["label"] == label for e in test) == round(0.2 * in_class)
    assert [e["index"] for e in digits_examples("test")] == [e["index"] for e in test]
    assert [e["index"] for e in digits_examples("test", seed=1)] != [e["index"] for e in test]
    with pytest.raises(ValueError):
        digits_examples("validation")


def test_digits_images_labels_and_questions(digits):
    train, test = digits
    data = load_digits()
    for example in train[:200] + test[:200]:
        image = example["image"]
        assert image.size == (32, 32) and image.mode == "RGB"
        label = example["label"]
        assert label == data.target[example["index"]]
        assert example["caption"] == f"the digit {DIGIT_NAMES[label]}"
        assert example["questions"] == [("what digit is this?", DIGIT_NAMES[label])]
        # Averaging each 4x4 block gives back (a bilinear blur of) its own 8x8 source image, scaled to 0..255.
        grey = pixels(image)[..., 0]
        assert (grey == pixels(image)[..., 2]).all()
        small = grey.reshape(8, 4, 8, 4).mean(axis=(1, 3))
        original = data.images[example["index"]] * 255 / 16
        assert np.abs(small - original).mean() < 35
        assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.9
    assert DIGIT_NAMES[7] == "seven"


def test_chat_format_renders_with_the_sonett_template(shapes_train):
    example = shapes_train[0]
    question, answer = example["questions"][0]
    messages = to_chat(example, question, answer)
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    records = qa_records(shapes_train[:3])
    assert len(records) == sum(len(e["questions"]) for e in shapes_train[:3])
    assert records[0]["messages"] == messages and records[0]["image"] is example["image"]

    texts = [e["caption"] for e in shapes_train[:200]] + [
        q + " " + a for e in shapes_train[:50] for q, a in e["questions"]
    ]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.count(IMAGE_TOKEN) == 1
    assert f"{IMAGE_TOKEN}{question}<|end|>" in rendered
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    answer_part = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert answer_part.replace(" ", "").startswith(answer)
