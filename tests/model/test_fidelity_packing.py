"""Packed sequences and custom 4-D attention masks (issue 14, item 7).

Several documents packed into one row, with `position_ids` restarting at 0 at each document (what transformers'
`DataCollatorWithFlattening` produces), give every document exactly the logits of running it alone, for every
layer kind; the training loss of the packed row is the loss of the documents run alone. A custom 4-D mask works for
softmax layers and is refused with a clear error for the kinds that cannot read one.
"""

import pytest
import torch
from helpers_hierarchy import hourglass_model
from helpers_model import max_diff, random_ids
from helpers_packing import CHUNK, LENGTHS, PACKING_MIXES, block_diagonal_4d, causal_4d, documents, pack, packing_model
from helpers_vision import multimodal, pixels, prompt
from torch.nn import functional as F
from transformers import DataCollatorWithFlattening

from sonett.model.linear_attention_sonett import chunk_linear_attention, recurrent_linear_attention


def assert_packed_equals_alone(model, docs, atol=1e-5, **packed_kwargs):
    input_ids, position_ids = pack(docs)
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, **packed_kwargs).logits[0]
        start = 0
        for i, doc in enumerate(docs):
            alone = model(doc[None]).logits[0]
            assert max_diff(packed[start : start + len(doc)], alone) <= atol, f"document {i}"
            start += len(doc)


VARIANTS = {
    **{mix: (mix, "sdpa", {}) for mix in PACKING_MIXES},
    "mixed-eager": ("mixed", "eager", {}),
    "mixed-flex": ("mixed", "flex_attention", {}),
    "sliding-adaptive-span": ("sliding", "eager", {"adaptive_span": True, "adaptive_span_ramp": 2}),
    "linear-no-conv-elu": ("linear", "sdpa", {"linear_conv_size": 0, "linear_feature_map": "elu"}),
    "memory-delta": ("memory", "sdpa", {"memory_update": "delta"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_documents_give_the_logits_and_loss_of_each_document_alone(variant):
    mix, attn, overrides = VARIANTS[variant]
    model = packing_model(mix, attn, **overrides)
    docs = documents()
    assert_packed_equals_alone(model, docs)

    # The loss: labels -100 at each document start (DataCollatorWithFlattening's separator) give the token-weighted
    # mean of the documents' own losses, the same as the documents in one padded batch.
    input_ids, position_ids = pack(docs)
    labels = torch.cat([torch.cat([torch.tensor([-100]), doc[1:]]) for doc in docs])[None]
    with torch.no_grad():
        packed_loss = model(input_ids, position_ids=position_ids, labels=labels).loss
        losses = [model(doc[None], labels=doc[None]).loss for doc in docs]
    targets = torch.tensor([len(doc) - 1 for doc in docs], dtype=torch.float)
    expected = (torch.stack(losses) * targets).sum() / targets.sum()
    assert abs(packed_loss.item() - expected.item()) <= 1e-5


def test_packed_documents_in_training_mode():
    """Training mode (no cache, dropout 0) packs the same way."""
    model = packing_model("mixed").train()
    assert_packed_equals_alone(model, documents((5, 12, 7), seed=11))


def one_sequence_reference(model, input_ids, position_ids):
    """Logits of a row run as ONE sequence with the given positions: the first token alone, then the rest through
    the cache (positions that continue a cache are never packing)."""
    with torch.no_grad():
        first = model(input_ids[:, :1], position_ids=position_ids[:, :1], use_cache=True)
        rest = model(input_ids[:, 1:], position_ids=position_ids[:, 1:], cache=first.cache).logits
    return torch.cat([first.logits, rest], dim=1)


def test_a_2d_mask_means_one_sequence_per_row_as_in_transformers():
    """Only rows without an attention_mask are examined for packing, as transformers' mask builders do: with the
    tokenizer's mask, positions that jump (e.g. PoSE-style skips, or restarts) are used as given in one sequence,
    also in padded rows."""
    model = packing_model("mixed")
    input_ids, position_ids = pack(documents())
    reference = one_sequence_reference(model, input_ids, position_ids)
    with torch.no_grad():
        with_mask = model(input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids)).logits
        packed = model(input_ids, position_ids=position_ids).logits
        padded_mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(input_ids)], dim=1)
        padded_ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), input_ids], dim=1)
        padded_positions = torch.cat([torch.zeros(1, 2, dtype=torch.long), position_ids], dim=1)
        padded = model(padded_ids, position_ids=padded_positions, attention_mask=padded_mask).logits[:, 2:]
    assert max_diff(with_mask, reference) <= 1e-4
    assert max_diff(padded, reference) <= 1e-4
    assert max_diff(packed, reference) > 1e-2  # without a mask the documents are kept apart


def test_two_packed_rows_with_different_boundaries():
    model = packing_model("mixed")
    first, second = documents((9, 13, 6)), documents((14, 5, 9), seed=20)
    ids_a, pos_a = pack(first)
    ids_b, pos_b = pack(second)
    with torch.no_grad():
        both = model(torch.cat([ids_a, ids_b]), position_ids=torch.cat([pos_a, pos_b])).logits
        assert max_diff(both[0], model(ids_a, position_ids=pos_a).logits[0]) <= 1e-5
        assert max_diff(both[1], model(ids_b, position_ids=pos_b).logits[0]) <= 1e-5
    assert_packed_equals_alone(model, second)


def test_data_collator_with_flattening_feeds_the_model():
    model = packing_model("mixed")
    docs = documents()
    features = [{"input_ids": doc.tolist()} for doc in docs]
    batch = DataCollatorWithFlattening(return_tensors="pt")(features)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    with torch.no_grad():
        out = model(**batch)
        start = 0
        for doc in docs:
            alone = model(doc[None]).logits[0]
            assert max_diff(out.logits[0, start : start + len(doc)], alone) <= 1e-5
            start += len(doc)
        losses = [model(doc[None], labels=doc[None]).loss for doc in docs]
    targets = torch.tensor([len(doc) - 1 for doc in docs], dtype=torch.float)
    assert abs(out.loss.item() - ((torch.stack(losses) * targets).sum() / targets.sum()).item()) <= 1e-5
    # The flash-attention kwargs the collator can add are accepted too (and ignored by the eager/sdpa paths).
    batch = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True, return_seq_idx=True)(
        features
    )
    with torch.no_grad():
        assert max_diff(model(**batch).logits, out.logits) <= 1e-6


def test_packed_input_is_run_without_a_cache():
    """The cache of a packed row would mix its documents: none is made by default, and one asked for is refused."""
    model = packing_model("mixed")
    input_ids, position_ids = pack(documents())
    with torch.no_grad():
        assert model(input_ids, position_ids=position_ids).cache is None
        with pytest.raises(ValueError, match="packed"):
            model(input_ids, position_ids=position_ids, use_cache=True)
        with pytest.raises(ValueError, match="packed"):
            model(input_ids, position_ids=position_ids, cache=model.make_cache())


def test_positions_that_continue_a_cache_are_not_packing():
    """Decoding continues positions (no restart): prefill + steps still equal the full forward."""
    model = packing_model("mixed")
    ids = random_ids(1, 12, seed=3)
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :8], position_ids=torch.arange(8)[None], use_cache=True).cache
        steps = [
            model(ids[:, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache).logits[:, -1] for t in range(8, 12)
        ]
    assert max_diff(torch.stack(steps, dim=1), full[:, 8:]) <= 1e-4


# ------------------------------------------------------------------------------------------------------------
# The linear-attention forms with resets against the naive oracle
# ------------------------------------------------------------------------------------------------------------


def naive_linear_attention_with_resets(q, k, v, log_decay, resets, initial_state=None):
    """o_t = Σ_{j<=t, same document} (Π_{m=j+1..t} a_m) (φq_t · φk_j) v_j (+ the carried initial state while no reset
    came yet); a reset at t means the state before t is forgotten."""
    a = log_decay.exp()
    seq_len = q.shape[2]
    document = resets.long().cumsum(-1)  # (batch, seq)
    outputs = []
    for t in range(seq_len):
        out = torch.zeros_like(v[:, :, 0])
        for j in range(t + 1):
            same = (document[:, t] == document[:, j]).float()[:, None]
            weight = (q[:, :, t] * k[:, :, j]).sum(-1) * a[:, :, j + 1 : t + 1].prod(-1) * same
            out = out + weight[..., None] * v[:, :, j]
        if initial_state is not None:
            fresh = (document[:, t] == 0).float()[:, None, None, None]
            carried = a[:, :, : t + 1].prod(-1)[..., None, None] * initial_state * fresh
            out = out + (q[:, :, t, None, :] @ carried).squeeze(-2)
        outputs.append(out)
    return torch.stack(outputs, dim=2)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_linear_attention_forms_reset_at_document_starts(chunk_size, with_state):
    generator = torch.Generator().manual_seed(0)
    batch, heads, seq, d_phi, head_dim = 2, 2, 11, 5, 3
    q = torch.randn(batch, heads, seq, d_phi, generator=generator)
    k = torch.randn(batch, heads, seq, d_phi, generator=generator)
    v = torch.randn(batch, heads, seq, head_dim, generator=generator)
    log_decay = F.logsigmoid(2 * torch.randn(batch, heads, seq, generator=generator))
    state = torch.randn(batch, heads, d_phi, head_dim, generator=generator) if with_state else None
    resets = torch.zeros(batch, seq, dtype=torch.bool)
    resets[0, [3, 4, 9]] = True  # includes documents of one token
    resets[1, [6]] = True
    expected = naive_linear_attention_with_resets(q, k, v, log_decay, resets, state)
    chunked, chunked_state = chunk_linear_attention(q, k, v, log_decay, chunk_size, state, resets=resets)
    recurrent, recurrent_state = recurrent_linear_attention(q, k, v, log_decay, state, resets=resets)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(recurrent, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked_state, recurrent_state, atol=1e-5, rtol=1e-4)
    # The final state is the last document's own: the same as running only that document from zero.
    _, last_state = recurrent_linear_attention(q[1:, :, 6:], k[1:, :, 6:], v[1:, :, 6:], log_decay[1:, :, 6:])
    torch.testing.assert_close(chunked_state[1:], last_state, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Custom 4-D masks
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_bool", [False, True], ids=["float", "bool"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mix", ["full", "sliding"])
def test_a_4d_causal_mask_gives_the_logits_of_no_mask(mix, attn, as_bool):
    model = packing_model(mix, attn)
    ids = random_ids(2, 11, seed=4)
    with torch.no_grad():
        expected = model(ids).logits
        got = model(ids, attention_mask=causal_4d(11, as_bool).expand(2, 1, 11, 11)).logits
    assert max_diff(got, expected) <= 1e-5


@pytest.mark.parametrize("as_bool", [False, True], ids=["float", "bool"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mix", ["full", "sliding"])
def test_a_block_diagonal_4d_mask_with_restarting_positions_gives_the_packed_result(mix, attn, as_bool):
    model = packing_model(mix, attn)
    docs = documents()
    mask = block_diagonal_4d(LENGTHS, as_bool)
    assert_packed_equals_alone(model, docs, attention_mask=mask)


def test_a_4d_mask_under_flex_attention_is_refused():
    """flex_attention would read the tensor mask through a score modification, which crashes on CPU in torch 2.13."""
    model = packing_model("full", "flex_attention")
    with pytest.raises(ValueError, match=r"'eager' or 'sdpa'.*set_attn_implementation\('sdpa'\)"):
        model(random_ids(1, 6), attention_mask=causal_4d(6, True))


def test_a_4d_mask_in_decoding_reads_the_cache():
    """A 4-D mask over cached + new keys (float, as transformers' common test builds it) during decoding."""
    model = packing_model("sliding", "eager")
    ids = random_ids(1, 12, seed=8)
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :9], attention_mask=causal_4d(9, False), use_cache=True).cache
        step = model(ids[:, 9:], attention_mask=causal_4d(12, False)[:, :, 9:], cache=cache).logits
    assert max_diff(step, full[:, 9:]) <= 1e-4


@pytest.mark.parametrize("mix", ["linear", "memory", "mixed"])
def test_a_4d_mask_is_refused_for_linear_and_memory_layers(mix):
    """A windowed mask is not block-diagonal (those are honoured: tests/model/test_hardening_inputs.py)."""
    model = packing_model(mix)
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match=r"linear_attention|memory_attention") as error:
        model(ids, attention_mask=causal_4d(6, False, window=3))
    assert "position_ids" in str(error.value) and "2-D" in str(error.value)


# ------------------------------------------------------------------------------------------------------------
# Hourglass and images
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_packed_documents_through_an_hourglass(k):
    """Each document is shortened on its own (groups counted from its own position 0), lengths off multiples of k."""
    model = hourglass_model(k, linear_chunk_size=CHUNK, memory_chunk_size=CHUNK)
    assert_packed_equals_alone(model, documents((4 * k + 1, 3 * k, 2 * k + 2), seed=40))
    input_ids, position_ids = pack(documents((7, 10), seed=41))
    with torch.no_grad():
        out = model(input_ids, position_ids=position_ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_packed_documents_with_images_see_only_their_own_images():
    _, model = multimodal()
    docs = [prompt(1, 9, markers=((1, 5),), seed=3)[0], prompt(1, 7, markers=((2,),), seed=4)[0]]
    images = pixels(1, 3)
    input_ids, position_ids = pack(docs)
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, pixel_values=images).logits[0]
        first = model(docs[0][None], pixel_values=images[:, :2]).logits[0]
        second = model(docs[1][None], pixel_values=images[:, 2:]).logits[0]
    assert max_diff(packed[:9], first) <= 1e-5
    assert max_diff(packed[9:], second) <= 1e-5


def test_packed_training_gradients_equal_those_of_the_documents_alone():
    """The backward pass through the reset chunked form, the masks and the per-document memory, in training mode."""
    model = packing_model("mixed", "eager").train()
    docs = documents()
    input_ids, position_ids = pack(docs)
    labels = torch.cat([torch.cat([torch.tensor([-100]), doc[1:]]) for doc in docs])[None]
    params = [p for p in model.parameters() if p.requires_grad]
    packed = torch.autograd.grad(model(input_ids, position_ids=position_ids, labels=labels).loss, params)
    targets = sum(len(doc) - 1 for doc in docs)
    alone = sum(model(doc[None], labels=doc[None]).loss * (len(doc) - 1) / targets for doc in docs)
    for got, expected in zip(packed, torch.autograd.grad(alone, params)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_trainer_evaluates_a_flattened_dataset_like_the_documents_alone(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = packing_model("mixed")
    docs = documents()
    dataset = Dataset.from_dict({"input_ids": [doc.tolist() for doc in docs]})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, use_cpu=True, report_to=[], disable_tqdm=True
    )
    trainer = Trainer(model=model, args=args, eval_dataset=dataset, data_collator=DataCollatorWithFlattening())
    eval_loss = trainer.evaluate()["eval_loss"]
    with torch.no_grad():
        losses = torch.stack([model(doc[None], labels=doc[None]).loss for doc in docs])
    targets = torch.tensor([len(doc) - 1 for doc in docs], dtype=torch.float)
    assert abs(eval_loss - ((losses * targets).sum() / targets.sum()).item()) <= 1e-5


def test_packed_input_under_an_untested_attention_kernel_is_refused():
    """A kernel without transformers' mask builders (flash, custom) would attend across documents: refused."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("sonett_packing_test_kernel", sdpa_attention_forward)
    model = packing_model("full", "sonett_packing_test_kernel")
    input_ids, position_ids = pack(documents())
    with pytest.raises(ValueError, match=r"Packed sequences.*set_attn_implementation\('sdpa'\)"):
        model(input_ids, position_ids=position_ids)
    with torch.no_grad():  # unpacked input still runs
        model(input_ids)
