"""Input hardening (issue 15, item 4 and part of item 10).

Item 4: a custom 4-D `attention_mask` for a model with linear_attention, memory_attention or hierarchy layers is
honoured exactly when it is a block-diagonal causal mask (each document then gets its logits alone, and no token of
one document moves another's logits), and refused with a clear error otherwise. Mask values: bool, 0/1 integers or
an additive float mask; anything else is refused. A 2-D mask with holes hides the masked tokens from every other
token, for every layer kind.

Item 10: token ids of other dtypes than int32/int64, labels outside the vocabulary (or the heads' num_labels), and
4-D masks of the wrong shape each get a clear ValueError instead of an error deep inside torch.
"""

import pytest
import torch
from helpers_hierarchy import hourglass_model
from helpers_model import VOCAB, max_diff, random_ids, tiny_config, tiny_model
from helpers_packing import LENGTHS, block_diagonal_4d, causal_4d, documents, pack, packing_model
from helpers_vision import vlm

from sonett import SonettForSequenceClassification, SonettForTokenClassification

STATEFUL_MIXES = ["linear", "memory", "mixed"]


def hourglass():
    return hourglass_model(2, linear_chunk_size=4, memory_chunk_size=4)


def stateful_model(mix):
    return hourglass() if mix == "hourglass" else packing_model(mix)


def alone_logits(model, docs):
    with torch.no_grad():
        return [model(doc[None]).logits[0] for doc in docs]


# ------------------------------------------------------------------------------------------------------------
# Item 4: block-diagonal 4-D masks are honoured by every layer kind
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_bool", [False, True], ids=["float", "bool"])
@pytest.mark.parametrize("mix", [*STATEFUL_MIXES, "hourglass"])
def test_a_block_diagonal_mask_gives_each_document_its_logits_alone(mix, as_bool):
    """The documents come from the mask alone (no position_ids): each gets exactly the logits of running it alone."""
    model = stateful_model(mix)
    docs = documents()
    input_ids, _ = pack(docs)
    with torch.no_grad():
        packed = model(input_ids, attention_mask=block_diagonal_4d(LENGTHS, as_bool)).logits[0]
    start = 0
    for i, (doc, alone) in enumerate(zip(docs, alone_logits(model, docs))):
        assert max_diff(packed[start : start + len(doc)], alone) <= 1e-5, f"document {i}"
        start += len(doc)


@pytest.mark.parametrize("mix", [*STATEFUL_MIXES, "hourglass"])
def test_changing_a_token_of_one_document_leaves_the_others_exactly(mix):
    """The issue's measurement: changing a token of document A moved document B's logits by 1.7-2.2."""
    model = stateful_model(mix)
    input_ids, position_ids = pack(documents())
    changed = input_ids.clone()
    changed[0, 3] = (changed[0, 3] + 11) % (VOCAB - 3) + 3
    mask = block_diagonal_4d(LENGTHS, True)
    with torch.no_grad():
        before = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
        after = model(changed, attention_mask=mask, position_ids=position_ids).logits
    first = LENGTHS[0]
    assert max_diff(before[:, 3:first], after[:, 3:first]) > 1e-3  # document A itself does change
    assert torch.equal(before[:, first:], after[:, first:])


def test_a_batch_of_rows_packed_differently():
    """Each row of a `(batch, 1, seq, seq)` mask has its own documents; a `(1, 1, seq, seq)` mask covers every row."""
    model = packing_model("mixed")
    docs = documents((7, 5), seed=30)
    ids = torch.cat(docs)[None].expand(2, -1).clone()
    mask = torch.cat([block_diagonal_4d((7, 5), True), block_diagonal_4d((12,), True)])
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        shared = model(ids, attention_mask=block_diagonal_4d((7, 5), True)).logits
        whole = model(ids[:1]).logits[0]
    first, second = alone_logits(model, docs)
    assert max_diff(got[0, :7], first) <= 1e-5 and max_diff(got[0, 7:], second) <= 1e-5
    assert max_diff(got[1], whole) <= 1e-5  # one document: the plain causal run
    assert max_diff(shared[1], got[0]) <= 1e-5


def test_a_block_diagonal_mask_runs_without_a_cache():
    model = packing_model("linear")
    ids, _ = pack(documents())
    with torch.no_grad():
        assert model(ids, attention_mask=block_diagonal_4d(LENGTHS, True)).cache is None
    with pytest.raises(ValueError, match="use_cache=False"):
        model(ids, attention_mask=block_diagonal_4d(LENGTHS, True), use_cache=True)


def prefix_lm(length, prefix):
    """Bidirectional over the first `prefix` tokens, causal after."""
    visible = torch.ones(length, length).tril().bool()
    visible[:prefix, :prefix] = True
    return visible[None, None]


def with_hole(length):
    """Causal, except that token 5 does not see token 2."""
    mask = causal_4d(length, True).clone()
    mask[0, 0, 5, 2] = False
    return mask


def interleaved(length):
    """Two documents whose tokens alternate: not contiguous spans."""
    document = torch.arange(length) % 2
    return ((document[:, None] == document[None, :]) & torch.ones(length, length).tril().bool())[None, None]


NOT_BLOCK_DIAGONAL = {
    "sliding-window": lambda n: causal_4d(n, True, window=3),
    "prefix-lm": lambda n: prefix_lm(n, 4),
    "hole": with_hole,
    "interleaved-documents": interleaved,
    "soft-bias": lambda n: causal_4d(n, False) + torch.where(causal_4d(n, True), -0.5, 0.0),
}


@pytest.mark.parametrize("case", list(NOT_BLOCK_DIAGONAL))
@pytest.mark.parametrize("mix", [*STATEFUL_MIXES, "hourglass"])
def test_other_4d_masks_are_refused_naming_the_layer_kind_and_the_fix(mix, case):
    model = stateful_model(mix)
    kind = {"linear": "linear_attention", "memory": "memory_attention", "hourglass": "hierarchy"}.get(mix, "linear_")
    with pytest.raises(ValueError, match="block-diagonal causal") as error:
        model(random_ids(1, 10), attention_mask=NOT_BLOCK_DIAGONAL[case](10))
    message = str(error.value)
    assert kind in message
    assert "position_ids" in message and "one row per document" in message and "full_attention" in message


def test_a_4d_mask_over_cached_keys_is_refused_for_a_stateful_model():
    model = packing_model("linear")
    ids = random_ids(1, 8)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).cache
    with pytest.raises(ValueError, match="cached"):
        model(ids[:, 6:], attention_mask=causal_4d(8, True)[:, :, 6:], cache=cache)


@pytest.mark.parametrize("as_bool", [False, True], ids=["float", "bool"])
def test_full_attention_models_keep_arbitrary_masks(as_bool):
    """A prefix-LM mask is not block-diagonal, but softmax-only models use it as given (as before)."""
    model = packing_model("full")
    mask = prefix_lm(8, 4)
    if not as_bool:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    with torch.no_grad():
        got = model(random_ids(1, 8), attention_mask=mask).logits
        plain = model(random_ids(1, 8)).logits
    assert torch.isfinite(got).all()
    assert max_diff(got[:, 4:], plain[:, 4:]) > 1e-3  # the prefix tokens see each other both ways


# ------------------------------------------------------------------------------------------------------------
# Item 4: the values of a mask
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["full", "linear"])
def test_a_0_1_integer_4d_mask_means_what_a_bool_mask_means(mix):
    """Before: an integer mask was added to the scores (+1 where visible), so it hid nothing."""
    model = packing_model(mix)
    ids, _ = pack(documents())
    mask = block_diagonal_4d(LENGTHS, True)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask.long()).logits
    assert torch.equal(got, expected)


BAD_VALUES = {
    "float-0-1": (lambda m: m.float(), "positive"),
    "float-nan": (lambda m: torch.zeros(m.shape).masked_fill(~m, float("nan")), "NaN"),
    "int-0-2": (lambda m: m.long() * 2, "0 and 1"),
    "int-minus-1": (lambda m: m.long() - 1, "0 and 1"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_4d_masks_with_other_values_are_refused(case):
    make, fragment = BAD_VALUES[case]
    model = packing_model("full")
    with pytest.raises(ValueError, match=fragment) as error:
        model(random_ids(1, 6), attention_mask=make(causal_4d(6, True)))
    assert "bool" in str(error.value)


@pytest.mark.parametrize("values", [[1, 0.5, 1, 1], [0, float("-inf"), 0, 0], [1, 2, 1, 1]])
def test_2d_masks_with_other_values_than_0_and_1_are_refused(values):
    """An additive 2-D mask (0 / -inf) would read as its opposite: every nonzero value counts as a real token."""
    model = packing_model("mixed")
    with pytest.raises(ValueError, match="must hold 1 for real tokens and 0 for padding"):
        model(random_ids(1, 4), attention_mask=torch.tensor([values]))


@pytest.mark.parametrize("mix", ["full", "sliding", "linear", "memory", "mixed", "hourglass"])
def test_a_2d_mask_with_a_hole_hides_that_token_from_every_other(mix):
    """A 0 in the middle of a 2-D mask (transformers' meaning: that key is hidden): changing the hidden token moves
    no other token's logits, for every layer kind. Windows (sliding, conv, hourglass groups) still count its slot, so
    only full attention gives exactly the logits without that token (checked below)."""
    model = stateful_model(mix)
    ids = random_ids(1, 14, seed=3)
    mask = torch.ones(1, 14, dtype=torch.long)
    mask[0, 5] = 0
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 7) % (VOCAB - 3) + 3
    keep = [i for i in range(14) if i != 5]
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        after = model(changed, attention_mask=mask).logits
        removed = model(ids[:, keep]).logits
    assert torch.equal(before[:, keep], after[:, keep])
    if mix == "full":
        assert max_diff(before[:, keep], removed) <= 1e-5


# ------------------------------------------------------------------------------------------------------------
# Item 10: shapes and dtypes of masks and ids, label ranges
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["full", "linear"])
@pytest.mark.parametrize("keys", [5, 7])
def test_a_4d_mask_with_the_wrong_key_length_is_refused(mix, keys):
    model = packing_model(mix)
    mask = torch.ones(1, 1, 6, keys, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=rf"has {keys} key columns but there are 6 keys"):
        model(random_ids(1, 6), attention_mask=mask)


def test_a_4d_mask_with_a_wrong_head_dimension_is_refused():
    model = packing_model("full")
    with pytest.raises(ValueError, match=r"\(batch 1 or 1, 1, "):
        model(random_ids(1, 6), attention_mask=causal_4d(6, True).expand(1, 3, 6, 6))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16])
def test_input_ids_of_small_integer_dtypes_are_refused(dtype):
    """Before: a RuntimeError from the embedding; uint8 ids would also have wrapped any id above 255."""
    model = tiny_model("full")
    with pytest.raises(ValueError, match=rf"input_ids.*int64.*int32.*{dtype}"):
        model(random_ids(1, 4).to(dtype))


def test_int32_input_ids_and_labels_give_the_int64_result():
    model = tiny_model("full")
    ids = random_ids(2, 6)
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        expected = model(ids, labels=labels)
        got = model(ids.int(), labels=labels.int())
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 50, -1, -7])
@pytest.mark.parametrize("name", ["labels", "shift_labels"])
def test_labels_outside_the_vocabulary_are_refused(name, bad):
    """Before: IndexError 'Target 97 is out of bounds' from inside cross_entropy (a device assert on CUDA)."""
    model = tiny_model("full")
    ids = random_ids(2, 6)
    labels = torch.full_like(ids, -100)
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=rf"`{name}` holds {bad}.*vocab_size {VOCAB}.*-100"):
        model(ids, **{name: labels})


def test_labels_follow_ignore_index():
    model = tiny_model("full")
    ids = random_ids(1, 6)
    labels = ids.clone()
    labels[0, :3] = -1
    with torch.no_grad():
        expected = model(ids, labels=torch.where(labels == -1, -100, labels)).loss
        assert torch.equal(model(ids, labels=labels, ignore_index=-1).loss, expected)
    with pytest.raises(ValueError, match="holds -100"):
        model(ids, labels=torch.where(labels == -1, -100, labels), ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
def test_labels_of_small_integer_dtypes_are_refused(dtype):
    model = tiny_model("full")
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match=rf"`labels` must hold integer token ids.*int64.*{dtype}"):
        model(ids, labels=ids.to(dtype))


def test_vlm_labels_outside_the_vocabulary_are_refused():
    model = vlm()
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match=rf"`labels` holds {VOCAB}"):
        model(ids, labels=torch.full_like(ids, VOCAB))


@pytest.mark.parametrize("bad", [3, -1])
def test_sequence_classification_labels_outside_num_labels_are_refused(bad):
    torch.manual_seed(0)
    model = SonettForSequenceClassification(tiny_config("full", num_labels=3)).eval()
    with pytest.raises(ValueError, match=rf"`labels` holds {bad}.*num_labels 3"):
        model(random_ids(2, 5), labels=torch.tensor([0, bad]))
    with torch.no_grad():  # valid labels (and -100, which cross_entropy ignores) still give a loss
        assert torch.isfinite(model(random_ids(2, 5), labels=torch.tensor([2, -100])).loss)


def test_regression_and_multi_label_targets_are_not_range_checked():
    torch.manual_seed(0)
    model = SonettForSequenceClassification(tiny_config("full", num_labels=1)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(2, 5), labels=torch.tensor([7.5, -3.0])).loss)
    model = SonettForSequenceClassification(tiny_config("full", num_labels=3)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(2, 5), labels=torch.tensor([[1.0, 0, 1], [0, 1, 0]])).loss)


@pytest.mark.parametrize("bad", [3, -2])
def test_token_classification_labels_outside_num_labels_are_refused(bad):
    torch.manual_seed(0)
    model = SonettForTokenClassification(tiny_config("full", num_labels=3)).eval()
    labels = torch.tensor([[0, 1, 2, -100, bad]])
    with pytest.raises(ValueError, match=rf"`labels` holds {bad}.*num_labels 3"):
        model(random_ids(1, 5), labels=labels)
