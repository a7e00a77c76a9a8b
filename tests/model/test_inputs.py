"""Bad input gets a ValueError that names the problem, never a crash deep inside torch."""

import re

import pytest
import torch
from helpers_model import VOCAB, random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("mixed")


def run(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs)


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 50, -1])
def test_token_id_outside_vocab(model, bad_id):
    ids = torch.tensor([[5, 6, bad_id, 7]])
    with pytest.raises(ValueError, match=rf"Token id {bad_id}\b.*vocab_size {VOCAB}"):
        run(model, input_ids=ids)


def test_token_id_outside_vocab_in_generate(model):
    with pytest.raises(ValueError, match=rf"Token id {VOCAB}\b.*vocab_size {VOCAB}"):
        model.generate(torch.tensor([[5, 6, VOCAB]]), max_new_tokens=2, pad_token_id=0)


def test_largest_valid_token_id_is_accepted(model):
    out = run(model, input_ids=torch.tensor([[0, VOCAB - 1]]))
    assert out.logits.shape == (1, 2, VOCAB)


@pytest.mark.parametrize("mask_shape", [(1, 4), (1, 2), (2, 3)])
def test_attention_mask_with_wrong_shape(model, mask_shape):
    ids = random_ids(1, 3)
    mask = torch.ones(mask_shape, dtype=torch.long)
    expected = re.escape(str(mask_shape)) + ".*" + re.escape("(1, 3)")
    with pytest.raises(ValueError, match=rf"attention_mask.*{expected}"):
        run(model, input_ids=ids, attention_mask=mask)


def test_attention_mask_must_cover_the_cached_tokens(model):
    ids = random_ids(1, 5)
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).cache
    with pytest.raises(ValueError, match=re.escape("attention_mask` has shape (1, 1)") + r".*\(1, 5\)"):
        run(model, input_ids=ids[:, 4:], attention_mask=torch.ones(1, 1, dtype=torch.long), cache=cache)


def test_cache_with_another_batch_size(model):
    """Reusing a batch-1 cache for a batch of 2 must be named, not fail inside torch.cat."""
    with torch.no_grad():
        cache = model(random_ids(1, 4), use_cache=True).cache
    with pytest.raises(ValueError, match=r"(?i)cache.*batch|batch.*cache"):
        run(model, input_ids=random_ids(2, 1), cache=cache)


@pytest.mark.parametrize("mask_shape", [(3,), (1, 3, 3)])
def test_attention_mask_with_wrong_rank(model, mask_shape):
    with pytest.raises(ValueError, match=rf"attention_mask.*{re.escape(str(mask_shape))}"):
        run(model, input_ids=random_ids(1, 3), attention_mask=torch.ones(mask_shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_empty_input_ids(model, shape):
    with pytest.raises(ValueError, match=rf"[Ee]mpty input.*{re.escape(str(shape))}"):
        run(model, input_ids=torch.zeros(shape, dtype=torch.long))


def test_empty_inputs_embeds(model):
    with pytest.raises(ValueError, match="[Ee]mpty input"):
        run(model, inputs_embeds=torch.zeros(1, 0, 32))


def test_both_input_ids_and_inputs_embeds(model):
    ids = random_ids(1, 3)
    with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
        run(model, input_ids=ids, inputs_embeds=model.model.embed_tokens(ids))


def test_neither_input_ids_nor_inputs_embeds(model):
    with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
        run(model, attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_one_dimensional_input_ids(model):
    with pytest.raises(ValueError, match=r"input_ids.*\(batch, seq_len\).*\(4,\)"):
        run(model, input_ids=torch.tensor([5, 6, 7, 8]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_input_ids(model, dtype):
    with pytest.raises(ValueError, match=rf"input_ids.*integer.*{re.escape(str(dtype))}"):
        run(model, input_ids=torch.tensor([[5, 6, 7]]).to(dtype))


def test_inputs_embeds_with_wrong_width(model):
    with pytest.raises(ValueError, match=r"inputs_embeds.*\(batch, seq_len, 32\).*\(1, 3, 16\)"):
        run(model, inputs_embeds=torch.zeros(1, 3, 16))


def test_position_ids_with_wrong_length(model):
    with pytest.raises(ValueError, match=r"position_ids.*\(1, 2\).*3 new tokens"):
        run(model, input_ids=random_ids(1, 3), position_ids=torch.tensor([[0, 1]]))


@pytest.mark.parametrize("labels_shape", [(1, 2), (1, 4), (2, 3), (3,)])
def test_labels_with_wrong_shape(model, labels_shape):
    labels = torch.full(labels_shape, 5, dtype=torch.long)
    expected = re.escape(str(labels_shape)) + ".*" + re.escape("(1, 3)")
    with pytest.raises(ValueError, match=rf"labels.*{expected}"):
        run(model, input_ids=random_ids(1, 3), labels=labels)


def test_labels_need_all_logits(model):
    ids = random_ids(1, 3)
    with pytest.raises(ValueError, match=r"labels.*logits_to_keep"):
        run(model, input_ids=ids, labels=ids, logits_to_keep=1)


def test_valid_labels_give_a_finite_loss_that_ignores_minus_100(model):
    ids = random_ids(2, 6)
    labels = ids.clone()
    labels[0, :3] = -100
    output = run(model, input_ids=ids, labels=labels)
    assert output.loss.ndim == 0
    assert torch.isfinite(output.loss)
    logits, targets = output.logits[:, :-1], labels[:, 1:]
    kept = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_float_labels_are_refused(model):
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="`labels` must hold integer token ids"):
        run(model, input_ids=ids, labels=ids.float())


def test_position_ids_of_the_wrong_shape_are_refused_and_1d_is_accepted(model):
    ids = random_ids(2, 4)
    with pytest.raises(ValueError, match="`position_ids` has shape"):
        run(model, input_ids=ids, position_ids=torch.arange(4).expand(3, 4))
    with pytest.raises(ValueError, match="`position_ids` has shape"):
        run(model, input_ids=ids, position_ids=torch.arange(5)[None])
    one_d = run(model, input_ids=ids, position_ids=torch.arange(4)).logits
    assert torch.allclose(one_d, run(model, input_ids=ids).logits, atol=1e-6)


def test_inputs_embeds_of_another_dtype_are_refused(model):
    embeds = torch.zeros(1, 3, model.config.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype torch.float64 but the model runs in torch.float32"):
        run(model, inputs_embeds=embeds)


def test_4d_mask_of_the_wrong_shape_is_refused(model):
    ids = random_ids(2, 4)
    with pytest.raises(ValueError, match="The 4-D `attention_mask` has shape"):
        run(model, input_ids=ids, attention_mask=torch.zeros(2, 1, 3, 4))


def test_assisted_decoding_is_refused_for_memory_layers():
    layer_types = ["memory_attention", "full_attention"]
    model = tiny_model("full", layer_types=layer_types, num_hidden_layers=2)
    helper = tiny_model("full", seed=1, layer_types=layer_types, num_hidden_layers=2)
    with pytest.raises(ValueError, match="crop"):
        model.generate(random_ids(1, 6), assistant_model=helper, max_new_tokens=4, do_sample=False, pad_token_id=0)
