"""The shipped digits (`sonett/data/digits.npz`) are exactly scikit-learn's `load_digits()`, so the vision recipe
needs no scikit-learn and gives the same images and splits as before."""

import hashlib

import numpy as np

from sonett.data.images import DIGITS_FILE, _load_digits, digits_examples, digits_split_indices

# sha256 of `load_digits().images.astype(np.uint8).tobytes()` and of `load_digits().target.astype(np.uint8).tobytes()`
# (scikit-learn 1.9.1; the arrays hold only the integers 0..16 and 0..9, so the uint8 copies are exact).
SKLEARN_IMAGES_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
SKLEARN_TARGETS_SHA256 = "8ba4f891220f5e4c9c819638d1602d74b83618f167043c6da52a2a247841ddf0"


def test_shipped_digits_equal_scikit_learns():
    images, targets = _load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float64
    assert targets.shape == (1797,) and targets.dtype == np.int64
    assert hashlib.sha256(images.astype(np.uint8).tobytes()).hexdigest() == SKLEARN_IMAGES_SHA256
    assert (images.astype(np.uint8) == images).all()
    assert hashlib.sha256(targets.astype(np.uint8).tobytes()).hexdigest() == SKLEARN_TARGETS_SHA256
    assert np.bincount(targets).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_shipped_digits_are_plain_arrays_in_a_small_file():
    assert DIGITS_FILE.stat().st_size < 64_000
    with np.load(DIGITS_FILE, allow_pickle=False) as data:  # no pickled objects: safe to load anywhere
        assert sorted(data.files) == ["images", "targets"]
        assert data["images"].dtype == np.uint8 and data["targets"].dtype == np.uint8


def test_digits_test_split_images_are_unchanged():
    # Recorded with the scikit-learn loader this file replaces: the same split and byte-identical images.
    train, test = digits_split_indices()
    assert (len(train), len(test)) == (1438, 359)
    examples = digits_examples("test")
    assert [example["index"] for example in examples[:5]] == [5, 9, 12, 14, 16]
    pixels = b"".join(np.asarray(example["image"]).tobytes() for example in examples)
    assert hashlib.sha256(pixels).hexdigest() == "59f5419aa7211381d471148555b6d599480989a532fada114781ba4039e5418d"
