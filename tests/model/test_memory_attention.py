"""memory_attention: sliding-window softmax attention plus a compressive memory of evicted tokens.

The oracle is written plainly here: for each position t, fold the tokens j <= t - W one by one into (M, z) with
the chosen rule, read the memory out, and compute the local softmax window naively.
"""

import pytest
import torch
from helpers_model import (
    PAD,
    VOCAB,
    WINDOW,
    assert_padded_batch_matches_rows_alone,
    left_pad,
    max_diff,
    random_ids,
    tiny_config,
)
from torch.nn import functional as F

from sonett import SonettCache, SonettForCausalLM
from sonett.model.attention_sonett import BlockedLocalMask
from sonett.model.layers_sonett import SonettRotaryEmbedding, apply_rotary_pos_emb
from sonett.model.memory_attention_sonett import MemoryAttentionMask, SonettMemoryAttention, memory_read

UPDATES = ["linear", "delta"]
updates = pytest.mark.parametrize("update", UPDATES)
MEMORY_MIXES = {
    "memory": ["memory_attention", "memory_attention"],
    "memory-sliding-full": ["memory_attention", "sliding_attention", "full_attention"],
}
memory_mixes = pytest.mark.parametrize("mix", list(MEMORY_MIXES))
CHUNK = 3  # memory_chunk_size of the tiny models: several chunks, and it divides few lengths


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one intra-op thread is faster, and does not stall when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def memory_model(mix="memory", update="linear", seed=0, attn=None, **overrides):
    """A seeded, eval-mode fp32 model whose layer list comes from MEMORY_MIXES."""
    layer_types = MEMORY_MIXES[mix]
    overrides = {"memory_update": update, "memory_chunk_size": CHUNK, **overrides}
    torch.manual_seed(seed)
    config = tiny_config("full", layer_types=list(layer_types), num_hidden_layers=len(layer_types), **overrides)
    model = SonettForCausalLM(config)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# The naive oracle
# ----------------------------------------------------------------------------------------------------------


def sigma(x):
    return F.elu(x) + 1


def unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def naive_memory_read(q, k, v, window, update, key_mask=None, return_state=False):
    """q (b, H, n, d), k/v (b, kvh, n, d), raw: query t reads the memory of the tokens j <= t - window.

    With `return_state`, also the state once token n leaves the window too, i.e. holding tokens 0..n - window.
    """
    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    memory = torch.zeros(b, kv_heads, d, v.shape[-1])
    normalizer = torch.zeros(b, kv_heads, d)

    def fold(j, memory, normalizer):  # token j leaves the window
        real = torch.ones(b) if key_mask is None else key_mask[:, j].float()
        fk = sigma(k[:, :, j]) * real[:, None, None]  # (b, kvh, d)
        if update == "linear":
            memory = memory + fk[..., :, None] * v[:, :, j, None, :]
        else:
            kh = unit(fk)
            residual = v[:, :, j] - (kh[..., None, :] @ memory)[..., 0, :]
            memory = memory + kh[..., :, None] * residual[..., None, :]
        return memory, normalizer + fk

    outputs = []
    for t in range(n):
        if t - window >= 0:
            memory, normalizer = fold(t - window, memory, normalizer)
        shared_memory = memory.repeat_interleave(heads // kv_heads, dim=1)
        shared_normalizer = normalizer.repeat_interleave(heads // kv_heads, dim=1)
        fq = sigma(q[:, :, t])  # (b, H, d)
        if update == "linear":
            read = (fq[..., None, :] @ shared_memory)[..., 0, :]
            read = read / ((fq * shared_normalizer).sum(-1, keepdim=True) + 1e-6)
        else:
            read = (unit(fq)[..., None, :] @ shared_memory)[..., 0, :]
        outputs.append(read)
    if not return_state:
        return torch.stack(outputs, dim=2)
    if n - window >= 0:
        memory, normalizer = fold(n - window, memory, normalizer)
    return torch.stack(outputs, dim=2), memory, normalizer


def naive_local(q, k, v, window):
    """Causal softmax over the last `window` keys (itself included); q (b, H, n, d), k/v (b, kvh, n, d)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    n = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    return scores.softmax(-1) @ v


def naive_layer(mixer, hidden, cos, sin):
    """The whole memory_attention layer, naively: (b, n, hidden) -> (b, n, hidden)."""
    b, n, _ = hidden.shape
    shape = (b, n, -1, mixer.head_dim)
    q = mixer.q_proj(hidden).view(shape).transpose(1, 2)
    k = mixer.k_proj(hidden).view(shape).transpose(1, 2)
    v = mixer.v_proj(hidden).view(shape).transpose(1, 2)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    local = naive_local(q_rot, k_rot, v, mixer.sliding_window)
    memory = naive_memory_read(q, k, v, mixer.sliding_window, mixer.memory_update)
    gate = torch.sigmoid(mixer.gate)[None, :, None, None]
    mixed = gate * memory + (1 - gate) * local
    return mixer.o_proj(mixed.transpose(1, 2).reshape(b, n, -1))


# ----------------------------------------------------------------------------------------------------------
# Chunked memory form == the naive sequential reference (outputs and gradients)
# ----------------------------------------------------------------------------------------------------------


def qkv(batch=2, heads=4, kv_heads=2, n=13, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=generator)
    k = torch.randn(batch, kv_heads, n, d, generator=generator)
    v = torch.randn(batch, kv_heads, n, d, generator=generator)
    return [t.requires_grad_() for t in (q, k, v)]


def output_and_grads(fn, tensors, seed=5):
    out = fn(*tensors)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out * weight).sum(), tensors, allow_unused=True, materialize_grads=True)
    return out.detach(), grads


@pytest.mark.parametrize("window", [1, 4, 30])
@pytest.mark.parametrize("chunk", [1, 5, 7, 16])
@updates
def test_chunked_memory_matches_naive(update, chunk, window):
    """13 queries, so 14 delayed positions (the last one only folds): chunk 7 divides 14, 5 does not, 16 is one
    chunk for all; window 1 is the shortest, 30 is longer than the sequence."""
    tensors = qkv()

    def chunked(q, k, v):
        return memory_read(q, k, v, delay=window, update=update, chunk_size=chunk)[0]

    def naive(q, k, v):
        return naive_memory_read(q, k, v, window, update)

    out, grads = output_and_grads(chunked, tensors)
    ref, ref_grads = output_and_grads(naive, tensors)
    assert out.shape == (2, 4, 13, 8)
    assert max_diff(out, ref) <= 1e-5
    if window < 13:
        assert out[:, :, window:].abs().max() > 1e-2  # the memory is really read
    assert out[:, :, :window].abs().max() == 0  # nothing has left the window yet
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        assert max_diff(grad, ref_grad) <= 1e-4
    # The state afterwards holds tokens 0..n - W (z = the sum of their sigma(k) in both modes).
    with torch.no_grad():
        _, memory, normalizer = memory_read(*tensors, delay=window, update=update, chunk_size=chunk)
        _, ref_memory, ref_normalizer = naive_memory_read(*tensors, window, update, return_state=True)
    assert memory.dtype == normalizer.dtype == torch.float32
    assert max_diff(memory, ref_memory) <= 1e-4
    assert max_diff(normalizer, ref_normalizer) <= 1e-4


@updates
def test_padded_keys_never_enter_the_memory(update):
    q, k, v = qkv(n=12)
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[0, :5] = False  # a left-padded row
    out = memory_read(q, k, v, delay=3, update=update, chunk_size=4, key_mask=key_mask)[0]
    ref = naive_memory_read(q, k, v, 3, update, key_mask=key_mask)
    assert max_diff(out, ref) <= 1e-5
    # The padded row alone: the same readout on its real tokens.
    alone = memory_read(q[:1, :, 5:], k[:1, :, 5:], v[:1, :, 5:], delay=3, update=update, chunk_size=4)[0]
    assert max_diff(out[:1, :, 5:], alone) <= 1e-5


@pytest.mark.parametrize("pieces", [(1,) * 14, (3, 1, 5, 2, 3), (6, 8)], ids=["token", "3-1-5-2-3", "6-8"])
@pytest.mark.parametrize("window", [1, 4, 20])
@updates
def test_recurrent_memory_matches_chunked(update, window, pieces):
    """Invariant 2: stepping with the stored window and state equals one chunked pass, outputs and gradients."""
    tensors = qkv(n=sum(pieces), seed=3)

    def chunked(q, k, v):
        return memory_read(q, k, v, delay=window, update=update, chunk_size=4)[0]

    def recurrent(q, k, v):
        outputs, memory, normalizer, start = [], None, None, 0
        window_k, window_v = k[:, :, :0], v[:, :, :0]
        for size in pieces:
            end = start + size
            entries_k = torch.cat([window_k, k[:, :, start:end]], dim=-2)
            entries_v = torch.cat([window_v, v[:, :, start:end]], dim=-2)
            out, memory, normalizer = memory_read(
                q[:, :, start:end],
                entries_k,
                entries_v,
                delay=window - window_k.shape[-2],
                update=update,
                chunk_size=4,
                memory=memory,
                normalizer=normalizer,
            )
            outputs.append(out)
            keep = max(entries_k.shape[-2] - (window - 1), 0)
            window_k, window_v = entries_k[:, :, keep:], entries_v[:, :, keep:]
            start = end
        return torch.cat(outputs, dim=2)

    out, grads = output_and_grads(chunked, tensors)
    ref, ref_grads = output_and_grads(recurrent, tensors)
    assert max_diff(out, ref) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert max_diff(grad, ref_grad) <= 1e-4


# ----------------------------------------------------------------------------------------------------------
# The whole layer == the naive layer, with and without a cache
# ----------------------------------------------------------------------------------------------------------


def layer_setup(update, window, attn):
    torch.manual_seed(0)
    config = tiny_config(
        "full",
        layer_types=["memory_attention"],
        num_hidden_layers=1,
        sliding_window=window,
        memory_update=update,
        memory_chunk_size=CHUNK,
    )
    config._attn_implementation = attn
    mixer = SonettMemoryAttention(config, 0)
    for module in (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.o_proj):
        torch.nn.init.normal_(module.weight, std=0.2)
    with torch.no_grad():
        mixer.gate.normal_()  # a different mix per head
    rotary = SonettRotaryEmbedding(config, ["memory_attention"])
    return config, mixer, rotary


def run_mixer(config, mixer, rotary, hidden, start=0, cache=None, allow_blocked=True):
    positions = torch.arange(start, start + hidden.shape[1])[None].expand(hidden.shape[0], -1)
    cos, sin = rotary(hidden, positions, "memory_attention")
    mask = mixer.build_mask(
        "memory_attention",
        allow_blocked=allow_blocked,
        config=config,
        inputs_embeds=hidden,
        attention_mask=None,
        cache=cache,
        position_ids=positions,
        layer_idx=0,
    )
    assert isinstance(mask, MemoryAttentionMask)
    long_prefill = hidden.shape[1] > 2 * config.sliding_window and (cache is None or cache.get_seq_length() == 0)
    assert isinstance(mask.local, BlockedLocalMask) == (allow_blocked and long_prefill)
    return mixer(hidden, position_embeddings=(cos, sin), attention_mask=mask, cache=cache)[0]


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "dense"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [3, 20])
@updates
def test_layer_matches_naive_layer(update, window, attn, blocked):
    """11 tokens > 2 * 3: with window 3 the local part runs blocked unless told otherwise."""
    config, mixer, rotary = layer_setup(update, window, attn)
    hidden = torch.randn(2, 11, config.hidden_size, generator=torch.Generator().manual_seed(1)).requires_grad_()
    positions = torch.arange(11)[None].expand(2, -1)
    cos, sin = rotary(hidden, positions, "memory_attention")
    params = [hidden, *mixer.parameters()]

    out, grads = output_and_grads(lambda *_: run_mixer(config, mixer, rotary, hidden, allow_blocked=blocked), params)
    ref, ref_grads = output_and_grads(lambda *_: naive_layer(mixer, hidden, cos, sin), params)
    assert max_diff(out, ref) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert max_diff(grad, ref_grad) <= 1e-4
    assert grads[-1].abs().min() > 0  # every head's gate gets a gradient

    # The same layer with a cache, in pieces, against the naive layer on the whole sequence.
    cache, pieces, start = SonettCache(config), [], 0
    with torch.no_grad():
        for size in (4, 1, 1, 5):
            pieces.append(run_mixer(config, mixer, rotary, hidden[:, start : start + size], start, cache))
            start += size
    assert max_diff(torch.cat(pieces, dim=1), ref) <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# Invariant 1: prefill + decode and chunked prefill equal the full forward
# ----------------------------------------------------------------------------------------------------------

PROMPT_LEN = 14  # > WINDOW, so tokens leave the window during prefill and during decoding


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@updates
@memory_mixes
def test_prefill_then_decode_matches_full_forward(mix, update, attn):
    model = memory_model(mix, update, attn=attn)
    ids = random_ids(2, PROMPT_LEN)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(5, PROMPT_LEN):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-4
    assert cache.get_seq_length() == PROMPT_LEN


@pytest.mark.parametrize("chunks", [(5, 4, 3, 2), (1, 2, 9, 1, 1)], ids=["5-4-3-2", "1-2-9-1-1"])
@updates
@memory_mixes
def test_chunked_prefill_matches_full_forward(mix, update, chunks):
    model = memory_model(mix, update)
    ids = random_ids(2, sum(chunks), seed=3)
    with torch.no_grad():
        full = model(ids).logits
        cache, pieces, start = SonettCache(model.config), [], 0
        for size in chunks:
            pieces.append(model(ids[:, start : start + size], cache=cache, use_cache=True).logits)
            start += size
    assert max_diff(torch.cat(pieces, dim=1), full) <= 1e-4


def test_output_attentions_are_the_local_window():
    model = memory_model("memory", attn="eager")
    ids = random_ids(2, 10)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    for weights in out.attentions:
        assert weights.shape == (2, model.config.num_attention_heads, 10, 10)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 10), atol=1e-5)
        assert float(weights.triu(1).abs().max()) == 0.0
        assert float(weights.tril(-WINDOW).abs().max()) == 0.0  # the memory part has no attention weights


# ----------------------------------------------------------------------------------------------------------
# Invariant 3: causality; the memory reaches far beyond the window
# ----------------------------------------------------------------------------------------------------------


def perturbed(ids, t):
    changed = ids.clone()
    changed[:, t] = (ids[:, t] - 3 + 1) % (VOCAB - 3) + 3
    return changed


@pytest.mark.parametrize("t", [2, 9])
@updates
@memory_mixes
def test_causality(mix, update, t):
    model = memory_model(mix, update)
    ids = random_ids(1, 18, seed=5)
    with torch.no_grad():
        a = model(ids).logits
        b = model(perturbed(ids, t + 1)).logits
    assert max_diff(a[:, : t + 1], b[:, : t + 1]) <= 1e-6
    diffs = (a[0, t + 1 :] - b[0, t + 1 :]).abs().amax(-1)
    assert bool((diffs > 1e-4).all()), diffs


@updates
def test_tokens_far_outside_the_window_still_matter_unless_the_gate_is_closed(update):
    """Two memory layers of window 4 see 2 * 3 tokens back locally; the memory reaches everything before."""
    model = memory_model("memory", update)
    ids = random_ids(1, 40, seed=6)
    reach = 2 * (WINDOW - 1)
    with torch.no_grad():
        a = model(ids).logits
        b = model(perturbed(ids, 0)).logits
        assert max_diff(a[:, -1], b[:, -1]) > 1e-4
        for layer in model.model.layers:
            layer.mixer.gate.fill_(float("-inf"))  # g = 0: a plain sliding-window model
        a = model(ids).logits
        b = model(perturbed(ids, 0)).logits
    assert max_diff(a[:, : reach + 1], b[:, : reach + 1]) > 1e-4
    assert max_diff(a[:, reach + 1 :], b[:, reach + 1 :]) == 0


# ----------------------------------------------------------------------------------------------------------
# Invariant 4: left padding
# ----------------------------------------------------------------------------------------------------------

ROW_LENGTHS = (12, 7, 2, 10)  # one row shorter than the stored window


@updates
@memory_mixes
def test_left_padded_batch_matches_rows_alone(mix, update):
    """Prefill a padded batch, then decode two tokens through the cache; every row as if it ran alone."""
    rows = [random_ids(1, n, seed=20 + i)[0] for i, n in enumerate(ROW_LENGTHS)]
    assert_padded_batch_matches_rows_alone(memory_model(mix, update), rows, *left_pad(rows))


# ----------------------------------------------------------------------------------------------------------
# generate(): the same tokens with and without the cache
# ----------------------------------------------------------------------------------------------------------

STRATEGIES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 0},
    "beam-3": {"do_sample": False, "num_beams": 3},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@updates
@memory_mixes
def test_generate_with_and_without_cache(mix, update, strategy):
    model = memory_model(mix, update)
    rows = [random_ids(1, 7, seed=41)[0], random_ids(1, 4, seed=42)[0]]
    input_ids, attention_mask = left_pad(rows)
    results = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        with torch.no_grad():
            results.append(
                model.generate(
                    input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=8,
                    min_new_tokens=8,
                    pad_token_id=PAD,
                    use_cache=use_cache,
                    **STRATEGIES[strategy],
                )
            )
    assert results[0].shape == (2, 15)
    assert torch.equal(results[0], results[1])


# ----------------------------------------------------------------------------------------------------------
# The cache evicts: a constant-size state however long the context
# ----------------------------------------------------------------------------------------------------------


@updates
def test_cache_keeps_the_window_and_a_constant_size_memory(update):
    # 300 tokens: past the tiny configs' 256 positions, which the full_attention layer would refuse.
    model = memory_model("memory-sliding-full", update, max_position_embeddings=512)
    config = model.config
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    ids = random_ids(2, 300, seed=7)

    def memory_layer_state(cache):
        layer = cache.layers[0]
        assert layer.keys.shape == layer.values.shape == (2, kv_heads, WINDOW - 1, head_dim)
        assert layer.memory_keys.shape == (2, kv_heads, WINDOW - 1, head_dim)
        assert layer.memory.shape == (2, kv_heads, head_dim, head_dim)
        assert layer.normalizer.shape == (2, kv_heads, head_dim)
        assert layer.memory.dtype == layer.normalizer.dtype == torch.float32
        return {name: tensor.nbytes for name, tensor in layer.state_tensors().items()}

    with torch.no_grad():
        cache = model(ids[:, :50], use_cache=True).cache
        at_50 = memory_layer_state(cache)
        for t in range(50, 60):
            model(ids[:, t : t + 1], cache=cache)
        last = model(ids[:, 60:], cache=cache).logits[:, -1]
        full = model(ids).logits[:, -1]
    assert cache.get_seq_length() == 300
    assert memory_layer_state(cache) == at_50
    assert max_diff(last, full) <= 1e-4


@updates
def test_memory_state_survives_save_and_load(update, tmp_path):
    model = memory_model("memory", update)
    ids = random_ids(1, 20, seed=8)
    with torch.no_grad():
        cache = model(ids[:, :15], use_cache=True).cache
        cache.save(tmp_path / "memory.safetensors")
        loaded = SonettCache.load(tmp_path / "memory.safetensors", model.config)
        continued = model(ids[:, 15:], cache=loaded).logits
        full = model(ids).logits[:, 15:]
    assert max_diff(continued, full) <= 1e-4


# ----------------------------------------------------------------------------------------------------------
# Parameters: gradients, gate initialisation, loading
# ----------------------------------------------------------------------------------------------------------


@updates
@memory_mixes
def test_gradients_reach_every_parameter(mix, update):
    model = memory_model(mix, update).train()
    ids = random_ids(2, 12, seed=9)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    gates = [layer.mixer.gate for layer in model.model.layers if layer.kind == "memory_attention"]
    assert gates and all(gate.grad.abs().min() > 0 for gate in gates)  # every head's gate


def test_gate_starts_at_one_half_and_loads_from_a_checkpoint(tmp_path):
    model = memory_model("memory")
    gate = model.model.layers[0].mixer.gate
    assert gate.shape == (model.config.num_attention_heads,)
    assert torch.equal(torch.sigmoid(gate), torch.full_like(gate, 0.5))
    with torch.no_grad():
        gate.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    model.save_pretrained(tmp_path)
    loaded = SonettForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].mixer.gate, gate)
    assert torch.equal(loaded.model.layers[1].mixer.gate, torch.zeros(4))
