"""The blocked sliding-window path equals the dense `create_sliding_window_causal_mask` path: outputs and gradients,
eager and sdpa, with and without grouped key heads, lengths that are not a multiple of the window, RoPE applied,
in training (one call) and in a prefill without autograd (chunks of query blocks)."""

import pytest
import torch
from helpers_memory import peak_allocated_bytes
from helpers_model import PAD, WINDOW, left_pad, random_ids, tiny_model

from sonett.model import attention_sonett, layers_sonett
from sonett.model.attention_sonett import BlockedLocalMask, blocked_local_attention

LENGTHS = [9, 12, 23]  # > 2 * window (4), so the blocked path applies; 12 is a multiple of the window


def mixer_output(model, hidden: torch.Tensor, blocked: bool, layer_idx: int = 0) -> torch.Tensor:
    """The sliding layer's mixer on `hidden` `(batch, seq, hidden_size)`, blockwise or under the dense mask."""
    mixer = model.model.layers[layer_idx].mixer
    positions = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
    mask = mixer.build_mask(
        "sliding_attention",
        allow_blocked=blocked,
        config=model.config,
        inputs_embeds=hidden,
        attention_mask=None,
        cache=None,
        position_ids=positions,
        layer_idx=layer_idx,
    )
    assert isinstance(mask, BlockedLocalMask) == blocked
    rope = model.model.rotary_emb(hidden, positions, "sliding_attention")
    return mixer(hidden, position_embeddings=rope, attention_mask=mask)[0]


def output_and_gradients(model, hidden: torch.Tensor, blocked: bool, weights: torch.Tensor):
    model.zero_grad()
    hidden = hidden.clone().requires_grad_(True)
    output = mixer_output(model, hidden, blocked)
    (output * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.model.layers[0].mixer.named_parameters()}
    return output.detach(), hidden.grad, grads


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # 4 query heads: groups of 4, 2 and 1
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blocked_training_equals_dense_mask(attn, length, kv_heads):
    model = tiny_model("sliding", attn_implementation=attn, num_key_value_heads=kv_heads).train()
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, length, model.config.hidden_size, generator=generator)
    weights = torch.randn(2, length, model.config.hidden_size, generator=generator)
    blocked = output_and_gradients(model, hidden, True, weights)
    dense = output_and_gradients(model, hidden, False, weights)
    torch.testing.assert_close(blocked[0], dense[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(blocked[1], dense[1], rtol=0, atol=1e-5)
    assert blocked[2].keys() == dense[2].keys() and len(dense[2]) == 4
    for name in dense[2]:
        torch.testing.assert_close(blocked[2][name], dense[2][name], rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("chunk", [WINDOW, 2 * WINDOW + 1])  # one block per chunk; two (the odd size rounds down)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blocked_prefill_chunks_equal_dense_mask(monkeypatch, attn, chunk):
    monkeypatch.setattr(attention_sonett, "PREFILL_CHUNK_TOKENS", chunk)
    model = tiny_model("sliding", attn_implementation=attn)
    hidden = torch.randn(2, 31, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        blocked = mixer_output(model, hidden, True)  # also rotates in place, chunk by chunk
    dense = mixer_output(model, hidden, False).detach()  # with autograd: one call, the reference
    torch.testing.assert_close(blocked, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_model_training_blocked_equals_dense(attn):
    """Whole model (sliding, full and sliding layers): logits and every gradient, blocked against the dense mask
    (attention weights requested force the dense path, on eager)."""
    model = tiny_model("mixed", attn_implementation=attn).train()
    ids = random_ids(2, 23)

    def run(dense: bool):
        model.zero_grad()
        out = model(ids, labels=ids, output_attentions=dense)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    blocked_logits, blocked_grads = run(False)
    dense_logits, dense_grads = run(True)
    torch.testing.assert_close(blocked_logits, dense_logits, rtol=0, atol=1e-5)
    assert blocked_grads.keys() == dense_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(blocked_grads[name], dense_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blocked_path_applies_attention_dropout(attn):
    model = tiny_model("sliding", attn_implementation=attn, attention_dropout=0.5).train()
    hidden = torch.randn(1, 23, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    dropped = mixer_output(model, hidden, True)
    model.eval()  # no dropout
    assert (dropped - mixer_output(model, hidden, True)).abs().max() > 1e-3


def test_blocked_prefill_holds_no_sequence_long_copies():
    """Without autograd, the blocked path's copies and scores are chunk-sized: the peak of what it allocates is
    the output plus a fraction of it (one call over a 16k sequence held several sequence-long copies)."""
    model = tiny_model("sliding", attn_implementation="sdpa", num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(1, 4, 16 * 1024, 8, generator=generator)
    key, value = (torch.randn(1, 2, 16 * 1024, 8, generator=generator) for _ in range(2))
    mixer = model.model.layers[0].mixer
    with torch.no_grad():
        peak = peak_allocated_bytes(lambda: blocked_local_attention(mixer, query, key, value, 64, scaling=0.3)[0])
    assert peak < 2 * query.nbytes, (peak, query.nbytes)  # one call: 13x


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_chunked_prefill_of_the_model_equals_one_call(monkeypatch, attn):
    """Without autograd, with chunks far smaller than the prompt (blocked attention, RoPE in place, MLP), a prefill
    gives the logits of the one-call forward with autograd, fills the cache for decoding, and a left-padded batch
    (dense mask, chunked RoPE and MLP) gives them too."""
    monkeypatch.setattr(attention_sonett, "PREFILL_CHUNK_TOKENS", 8)
    monkeypatch.setattr(layers_sonett, "MLP_CHUNK_TOKENS", 8)
    model = tiny_model("mixed", attn_implementation=attn)
    ids = random_ids(2, 30)
    reference = model(ids).logits.detach()  # autograd on: one call everywhere
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = model(random_ids(2, 1, seed=9), cache=out.cache).logits
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-5)
    longer = model(torch.cat([ids, random_ids(2, 1, seed=9)], 1)).logits.detach()
    torch.testing.assert_close(step[:, -1], longer[:, -1], rtol=0, atol=1e-4)

    input_ids, attention_mask = left_pad([ids[0, :30], ids[1, :21]], pad_id=PAD)
    padded_reference = model(input_ids, attention_mask=attention_mask).logits.detach()
    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(padded[real], padded_reference[real], rtol=0, atol=1e-5)
