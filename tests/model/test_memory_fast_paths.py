"""memory_attention's fast paths against the pure-PyTorch reference (docs/design.md, invariant 2).

`memory_read` (all chunks at once, blockwise without gradients) must equal `reference_memory_read` (the chunk-by-chunk
loop) in outputs and gradients; the one-token decode step (`memory_decode_step`, in place on the cache's state) must
give the tokens and per-step logits of the reference path; and a no-grad prefill must never hold per-token
intermediates for more than one block.
"""

import pytest
import torch
from helpers_model import PAD, left_pad, max_diff, random_ids, tiny_config
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sonett import SonettForCausalLM
from sonett.model import memory_attention_sonett
from sonett.model.layers_sonett import PackedDocuments, SonettRotaryEmbedding
from sonett.model.memory_attention_sonett import (
    MemoryAttentionMask,
    SonettMemoryAttention,
    memory_read,
    reference_memory_read,
)

UPDATES = ["linear", "delta"]
updates = pytest.mark.parametrize("update", UPDATES)
CHUNK = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and does not stall when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors(batch, heads, kv_heads, queries, entries, dim=8, seed=0, state=False):
    """Raw q `(batch, heads, queries, dim)`, k/v `(batch, kv_heads, entries, dim)` (and a starting M, z), with grads."""
    generator = torch.Generator().manual_seed(seed)
    out = [
        torch.randn(batch, heads, queries, dim, generator=generator),
        torch.randn(batch, kv_heads, entries, dim, generator=generator),
        torch.randn(batch, kv_heads, entries, dim, generator=generator),
    ]
    if state:
        out.append(torch.randn(batch, kv_heads, dim, dim, generator=generator) * 0.3)
        out.append(torch.rand(batch, kv_heads, dim, generator=generator) * 5)
    return [t.requires_grad_() for t in out]


def outputs_and_grads(fn, inputs, seed=5):
    out, memory, normalizer = fn(*inputs)
    generator = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=generator)).sum() for t in (out, memory, normalizer))
    grads = torch.autograd.grad(loss, inputs, materialize_grads=True)
    return (out.detach(), memory.detach(), normalizer.detach()), grads


# (new queries L, stored window entries P, window W): shorter and longer than a chunk (3) and than the window
CASES = {
    "shorter-than-chunk": (2, 0, 4),
    "shorter-than-window": (3, 0, 5),
    "one-chunk-past-window": (4, 0, 3),
    "long": (17, 0, 4),
    "long-window": (17, 0, 11),
    "cached-window-full": (7, 3, 4),
    "cached-window-partial": (9, 2, 6),
    "cached-one-token": (1, 3, 4),
}


@pytest.mark.parametrize("masked", [False, True], ids=["all-real", "padded"])
@pytest.mark.parametrize("case", list(CASES))
@updates
def test_fast_memory_read_matches_reference(update, case, masked):
    """Outputs, final state and gradients of q, k, v and of the starting state, against the chunk loop."""
    length, stored, window = CASES[case]
    inputs = tensors(2, 4, 2, length, stored + length, state=stored > 0)
    key_mask = None
    if masked:  # row 0 left-padded: its first entries never enter the memory
        key_mask = torch.ones(2, stored + length, dtype=torch.bool)
        key_mask[0, : (stored + length) // 2] = False

    def run(read):
        def fn(q, k, v, *state):
            memory, normalizer = state if state else (None, None)
            return read(q, k, v, window - stored, update, CHUNK, memory, normalizer, key_mask=key_mask)

        return fn

    (out, memory, normalizer), grads = outputs_and_grads(run(memory_read), inputs)
    (ref, ref_memory, ref_normalizer), ref_grads = outputs_and_grads(run(reference_memory_read), inputs)
    assert out.shape == ref.shape == (2, 4, length, 8)
    assert max_diff(out, ref) <= 1e-5
    assert max_diff(memory, ref_memory) <= 1e-5 and max_diff(normalizer, ref_normalizer) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert max_diff(grad, ref_grad) <= 1e-4
    if length >= window - stored + 1 or stored:
        assert out.abs().max() > 1e-2  # the memory is really read


@updates
def test_blocked_no_grad_read_matches_reference(update, monkeypatch):
    """Without gradients the read runs in blocks of PREFILL_BLOCK queries (here 4 chunks of 3): the same result."""
    monkeypatch.setattr(memory_attention_sonett, "PREFILL_BLOCK", 12)
    q, k, v, memory, normalizer = tensors(2, 4, 2, 41, 44, state=True)
    key_mask = torch.ones(2, 44, dtype=torch.bool)
    key_mask[1, :9] = False
    with torch.no_grad():
        args = (q, k, v, 1, update, CHUNK, memory, normalizer)
        out, new_memory, new_normalizer = memory_read(*args, key_mask=key_mask)
        ref, ref_memory, ref_normalizer = reference_memory_read(*args, key_mask=key_mask)
    assert max_diff(out, ref) <= 1e-5
    assert max_diff(new_memory, ref_memory) <= 1e-5 and max_diff(new_normalizer, ref_normalizer) <= 1e-5


class LargestAllocation(TorchDispatchMode):
    """Records the bytes of every storage that an operator returns while active (views of existing ones included)."""

    def __init__(self):
        super().__init__()
        self.sizes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in _pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.sizes[storage.data_ptr()] = max(self.sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return result


@updates
def test_long_no_grad_prefill_holds_no_full_length_intermediates(update):
    """Issue item 4: apart from the output itself (the size of the hidden states), nothing the read allocates spans
    more than one block of the 8-block prompt: no features, delayed copies or per-chunk outputs of every token."""
    length = 8 * memory_attention_sonett.PREFILL_BLOCK
    q, k, v = (t.detach() for t in tensors(1, 2, 1, length, length, dim=32))  # head_dim 32 as in sonett-tiny
    with torch.no_grad(), LargestAllocation() as recorder:
        out, _, _ = memory_read(q, k, v, 64, update, 32)
    output_bytes = out.untyped_storage().nbytes()
    given = {t.untyped_storage().data_ptr() for t in (q, k, v, out)}  # views of the inputs and the output
    created = [size for pointer, size in recorder.sizes.items() if pointer not in given]
    assert max(created) <= output_bytes // 4, (max(created), output_bytes)


def packed_layer(update):
    torch.manual_seed(0)
    config = tiny_config(
        "full", layer_types=["memory_attention"], num_hidden_layers=1, memory_update=update, memory_chunk_size=CHUNK
    )
    mixer = SonettMemoryAttention(config, 0)
    with torch.no_grad():
        mixer.gate.normal_()
    return config, mixer, SonettRotaryEmbedding(config, ["memory_attention"])


def run_layer(config, mixer, rotary, hidden, positions, documents=None, padding=None):
    cos, sin = rotary(hidden, positions, "memory_attention")
    mask = mixer.build_mask(
        "memory_attention",
        config=config,
        inputs_embeds=hidden,
        attention_mask=padding,
        cache=None,
        position_ids=positions,
        layer_idx=0,
        documents=documents,
    )
    assert isinstance(mask, MemoryAttentionMask)
    return mixer(hidden, position_embeddings=(cos, sin), attention_mask=mask)[0]


@pytest.mark.parametrize("layout", ["packed", "padded"])
@updates
def test_layer_outputs_and_gradients_match_the_reference_path(update, layout, monkeypatch):
    """The whole layer (gate included) on packed documents or a left-padded batch, fast against reference."""
    config, mixer, rotary = packed_layer(update)
    hidden = torch.randn(2, 15, config.hidden_size, generator=torch.Generator().manual_seed(1)).requires_grad_()
    documents = padding = None
    if layout == "packed":
        positions = torch.tensor([[*range(6), *range(9)], [*range(2), *range(11), *range(2)]])
        documents = PackedDocuments(torch.tensor([[0] * 6 + [1] * 9, [0] * 2 + [1] * 11 + [2] * 2]))
    else:
        positions = torch.arange(15)[None].expand(2, -1)
        padding = torch.ones(2, 15, dtype=torch.long)
        padding[1, :6] = 0
    params = [hidden, *mixer.parameters()]

    def run():
        out = run_layer(config, mixer, rotary, hidden, positions, documents, padding)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        return out.detach(), torch.autograd.grad((out * weight).sum(), params)

    out, grads = run()
    monkeypatch.setattr(memory_attention_sonett, "memory_read", reference_memory_read)
    ref, ref_grads = run()
    assert max_diff(out, ref) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert max_diff(grad, ref_grad) <= 1e-4
    assert grads[-1].abs().min() > 0  # the gate of every head


# ----------------------------------------------------------------------------------------------------------
# Decoding: the one-token step against the reference path
# ----------------------------------------------------------------------------------------------------------

NEW_TOKENS = 9  # prompts of 7 and 3 tokens: the window (4) fills during prefill for one row, during decoding for both


def memory_model(update):
    torch.manual_seed(0)
    layer_types = ["memory_attention", "sliding_attention", "memory_attention"]
    config = tiny_config(
        "full",
        layer_types=layer_types,
        num_hidden_layers=len(layer_types),
        memory_update=update,
        memory_chunk_size=CHUNK,
    )
    model = SonettForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.kind == "memory_attention":
                layer.mixer.gate.fill_(2.0)  # mostly memory, so that a wrong readout changes the tokens
    return model


def greedy(model, **kwargs):
    input_ids, attention_mask = left_pad([random_ids(1, 7, seed=61)[0], random_ids(1, 3, seed=62)[0]])
    with torch.no_grad():
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )


@pytest.mark.parametrize("implementation", ["dynamic", "static"])
@updates
def test_fast_decode_gives_the_reference_tokens_and_logits(update, implementation, monkeypatch):
    """Greedy decoding through the cache (one-token fast steps) against the reference read recomputed without a
    cache at every step, left padding included."""
    model = memory_model(update)
    fast = greedy(model, **({"cache_implementation": "static"} if implementation == "static" else {}))
    monkeypatch.setattr(memory_attention_sonett, "memory_read", reference_memory_read)
    reference = greedy(model, use_cache=False)
    assert torch.equal(fast.sequences, reference.sequences)
    for got, want in zip(fast.scores, reference.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@updates
def test_decode_step_folds_the_leaving_token_in_place(update, grad, monkeypatch):
    """With the window full, a no-grad one-token step writes the leaving token into the stored memory itself (same
    storage); with gradients on it builds new tensors. Either way the state and logits equal a reference prefill of
    all tokens, whose memory holds the same tokens."""
    model = memory_model(update)
    ids = random_ids(2, 12, seed=63)
    with torch.no_grad():
        cache = model(ids[:, :11], use_cache=True).cache
    storages = [(layer.memory.data_ptr(), layer.normalizer.data_ptr()) for layer in cache.layers[::2]]
    with torch.set_grad_enabled(grad):
        logits = model(ids[:, 11:], cache=cache).logits.detach()
    monkeypatch.setattr(memory_attention_sonett, "memory_read", reference_memory_read)
    with torch.no_grad():
        reference = model(ids, use_cache=True)
    assert max_diff(logits, reference.logits[:, -1:]) <= 1e-4
    for index, (memory_ptr, normalizer_ptr) in zip((0, 2), storages, strict=True):
        layer, reference_layer = cache.layers[index], reference.cache.layers[index]
        assert max_diff(layer.memory, reference_layer.memory) <= 1e-5
        assert max_diff(layer.normalizer, reference_layer.normalizer) <= 1e-5
        assert (layer.memory.data_ptr() == memory_ptr) == (not grad)
        assert (layer.normalizer.data_ptr() == normalizer_ptr) == (not grad)


@updates
def test_decode_after_an_inference_mode_prefill(update):
    """A state made under torch.inference_mode cannot be written in place outside it: the layer copies it once."""
    model = memory_model(update)
    ids = random_ids(1, 12, seed=64)
    with torch.inference_mode():
        cache = model(ids[:, :11], use_cache=True).cache
    with torch.no_grad():
        logits = model(ids[:, 11:], cache=cache).logits
        full = model(ids).logits[:, -1:]
    assert max_diff(logits, full) <= 1e-4


class NoHostSync(TorchDispatchMode):
    """Raises on any operator that copies a tensor's value to the host (`.item()`, `bool(tensor)`, `.tolist()`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation in the decode step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("implementation", ["dynamic", "static"])
def test_one_token_layer_step_has_no_host_sync(implementation):
    """The whole memory_attention layer's decode step (memory read, fold, cache update, local attention) on a
    left-padded batch whose window is full, without one value read back to the host."""
    model = memory_model("linear")
    ids, mask = left_pad([random_ids(1, 7, seed=61)[0], random_ids(1, 3, seed=62)[0]])
    cache = model.make_cache(implementation, max_cache_len=20)
    mixer = model.model.layers[0].mixer
    hidden = torch.randn(2, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    padding = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1).bool()
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        cos, sin = model.model.rotary_emb(hidden, torch.tensor([[7], [7]]), "sliding_attention")
        before = cache.layers[0].memory.clone()
        with NoHostSync():
            mixer(hidden, (cos, sin), attention_mask=MemoryAttentionMask(local=None, padding=padding), cache=cache)
    assert max_diff(cache.layers[0].memory, before) > 0  # a token left the window and was folded in
