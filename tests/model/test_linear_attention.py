"""linear_attention: the chunked and recurrent forms against a naive O(n²) oracle, the feature maps, and the
docs/design.md, invariants 1, 2, 3 and 4, through the full model, alone and mixed with softmax layers."""

import pytest
import torch
from helpers_model import (
    PAD,
    VOCAB,
    assert_decoding_reads_the_cache,
    assert_padded_batch_matches_rows_alone,
    left_pad,
    max_diff,
    random_ids,
    tiny_model,
)
from torch.nn import functional as F

from sonett import SonettCache, SonettForCausalLM
from sonett.model.cache_sonett import SonettLinearAttentionLayer
from sonett.model.linear_attention_sonett import (
    SonettLinearAttention,
    apply_feature_map,
    chunk_linear_attention,
    fla_available,
    fla_linear_attention,
    linear_feature_size,
    recurrent_linear_attention,
)

# ----------------------------------------------------------------------------------------------------------
# The oracle: o_t = Σ_{j<=t} (Π_{m=j+1..t} a_m) (φq_t · φk_j) v_j + (Π_{m<=t} a_m) φq_t · S_0
# ----------------------------------------------------------------------------------------------------------


def naive_linear_attention(q, k, v, log_decay, initial_state=None):
    """Outputs `(batch, heads, seq, head_dim)` and final state, written as plain sums over pairs (j, t)."""
    a = log_decay.exp()
    seq_len = q.shape[2]
    outputs = []
    for t in range(seq_len):
        out = torch.zeros_like(v[:, :, 0])
        for j in range(t + 1):
            weight = (q[:, :, t] * k[:, :, j]).sum(-1) * a[:, :, j + 1 : t + 1].prod(-1)
            out = out + weight[..., None] * v[:, :, j]
        if initial_state is not None:
            carried = a[:, :, : t + 1].prod(-1)[..., None, None] * initial_state
            out = out + (q[:, :, t, None, :] @ carried).squeeze(-2)
        outputs.append(out)
    state = sum(
        a[:, :, j + 1 :].prod(-1)[..., None, None] * k[:, :, j, :, None] * v[:, :, j, None, :] for j in range(seq_len)
    )
    if initial_state is not None:
        state = state + a.prod(-1)[..., None, None] * initial_state
    return torch.stack(outputs, dim=2), state


SEQ, D_PHI, HEAD_DIM = 11, 5, 3


def random_inputs(with_state, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, SEQ, D_PHI, generator=generator)
    k = torch.randn(2, 2, SEQ, D_PHI, generator=generator)
    v = torch.randn(2, 2, SEQ, HEAD_DIM, generator=generator)
    # strong and weak decays alike, so the decay matrix really matters
    log_decay = F.logsigmoid(2 * torch.randn(2, 2, SEQ, generator=generator))
    state = torch.randn(2, 2, D_PHI, HEAD_DIM, generator=generator) if with_state else None
    tensors = [t for t in (q, k, v, log_decay, state) if t is not None]
    for tensor in tensors:
        tensor.requires_grad_(True)
    return (q, k, v, log_decay, state), tensors


def outputs_and_grads(fn, inputs, tensors, seed=1):
    """Outputs, final state and the gradients of a random projection of both w.r.t. every input."""
    out, state = fn(*inputs)
    generator = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=generator)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=generator)).sum()
    grads = torch.autograd.grad(loss, tensors)
    return out.detach(), state.detach(), grads


def assert_same(got, expected):
    out, state, grads = got
    out_ref, state_ref, grads_ref = expected
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-4)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, SEQ, 16])
def test_chunked_form_equals_naive(chunk_size, with_state):
    inputs, tensors = random_inputs(with_state)
    expected = outputs_and_grads(naive_linear_attention, inputs, tensors)
    got = outputs_and_grads(lambda *x: chunk_linear_attention(*x[:4], chunk_size, x[4]), inputs, tensors)
    assert_same(got, expected)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_recurrent_form_equals_naive(with_state):
    inputs, tensors = random_inputs(with_state)
    expected = outputs_and_grads(naive_linear_attention, inputs, tensors)
    got = outputs_and_grads(recurrent_linear_attention, inputs, tensors)
    assert_same(got, expected)


def test_chunked_and_recurrent_forms_hand_over_the_state():
    """Chunked prefill, then token-by-token steps from its final state, equal one pass over everything."""
    (q, k, v, log_decay, state), _ = random_inputs(with_state=True, seed=3)
    with torch.no_grad():
        full, full_state = chunk_linear_attention(q, k, v, log_decay, 4, state)
        head, head_state = chunk_linear_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], log_decay[:, :, :7], 4, state)
        pieces, current = [head], head_state
        for t in range(7, SEQ):
            step = slice(t, t + 1)
            out, current = recurrent_linear_attention(
                q[:, :, step], k[:, :, step], v[:, :, step], log_decay[:, :, step], current
            )
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(current, full_state, atol=1e-5, rtol=1e-4)
    assert full_state.dtype == torch.float32


def test_forms_compute_in_fp32_and_return_the_value_dtype():
    (q, k, v, log_decay, state), _ = random_inputs(with_state=True)
    with torch.no_grad():
        reference, _ = chunk_linear_attention(q, k, v, log_decay, 4, state)
        for fn in (lambda *x: chunk_linear_attention(*x[:4], 4, x[4]), recurrent_linear_attention):
            out, final = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_decay, state)
            assert out.dtype == torch.bfloat16
            assert final.dtype == torch.float32
            assert max_diff(out.float(), reference) <= 0.1 * reference.abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Feature maps
# ----------------------------------------------------------------------------------------------------------


def test_taylor_feature_map_is_the_second_order_expansion_of_exp():
    generator = torch.Generator().manual_seed(0)
    d = 6
    q, k = torch.randn(2, 3, 7, d, generator=generator), torch.randn(2, 3, 7, d, generator=generator)
    phi_q, phi_k = apply_feature_map(q, "taylor"), apply_feature_map(k, "taylor")
    assert phi_q.shape == (2, 3, 7, 1 + d + d * d) == (2, 3, 7, linear_feature_size("taylor", d))
    s = (q * k).sum(-1) / d**0.5
    torch.testing.assert_close((phi_q * phi_k).sum(-1), 1 + s + s**2 / 2, atol=1e-5, rtol=1e-5)
    # close to exp(s) for small scores
    small_q, small_k = 0.1 * q, 0.1 * k
    small_s = (small_q * small_k).sum(-1) / d**0.5
    approx = (apply_feature_map(small_q, "taylor") * apply_feature_map(small_k, "taylor")).sum(-1)
    assert max_diff(approx, small_s.exp()) <= 1e-3


def test_elu_and_identity_feature_maps():
    x = torch.linspace(-4, 4, 33).view(1, 1, 3, 11)
    elu = apply_feature_map(x, "elu")
    torch.testing.assert_close(elu, torch.where(x > 0, x + 1, x.exp()))
    assert bool((elu > 0).all())
    assert torch.equal(apply_feature_map(x, "identity"), x)
    assert linear_feature_size("elu", 11) == linear_feature_size("identity", 11) == 11


# ----------------------------------------------------------------------------------------------------------
# The mixer: parameters, mask, initialisation
# ----------------------------------------------------------------------------------------------------------

LINEAR_ONLY = ["linear_attention", "linear_attention"]
HYBRID = ["linear_attention", "sliding_attention", "full_attention"]
HYBRID_LINEAR_LAST = ["full_attention", "sliding_attention", "linear_attention"]
# name -> (layer_types, feature map, conv size)
VARIANTS = {
    "linear-taylor-conv4": (LINEAR_ONLY, "taylor", 4),
    "linear-taylor-conv0": (LINEAR_ONLY, "taylor", 0),
    "linear-elu-conv4": (LINEAR_ONLY, "elu", 4),
    "linear-identity-conv0": (LINEAR_ONLY, "identity", 0),
    "hybrid-taylor-conv4": (HYBRID, "taylor", 4),
    "hybrid-elu-conv0": (HYBRID_LINEAR_LAST, "elu", 0),
    "hybrid-identity-conv4": (HYBRID_LINEAR_LAST, "identity", 4),
}
variants = pytest.mark.parametrize("variant", list(VARIANTS))
CHUNK = 4  # small, so prompts span several chunks and cut through them


def linear_overrides(variant):
    layer_types, feature_map, conv_size = VARIANTS[variant]
    return {
        "layer_types": list(layer_types),
        "num_hidden_layers": len(layer_types),
        "linear_feature_map": feature_map,
        "linear_conv_size": conv_size,
        "linear_feature_dim": 4,
        "linear_chunk_size": CHUNK,
    }


def linear_model(variant, seed=0):
    return tiny_model("full", seed=seed, **linear_overrides(variant))


def linear_mixers(model):
    return [layer.mixer for layer in model.model.layers if layer.kind == "linear_attention"]


def test_mixer_has_the_standard_projection_names():
    mixer = linear_mixers(linear_model("linear-taylor-conv4"))[0]
    assert isinstance(mixer, SonettLinearAttention)
    names = {name for name, _ in mixer.named_children()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "decay_proj", "conv1d", "norm"} <= names
    heads, d_f, head_dim = 4, 4, 8
    assert mixer.q_proj.out_features == mixer.k_proj.out_features == heads * d_f
    assert mixer.v_proj.out_features == mixer.gate_proj.out_features == heads * head_dim
    assert mixer.decay_proj.out_features == heads
    assert mixer.conv1d.weight.shape == (2 * heads * d_f + heads * head_dim, 1, 4)
    assert "conv1d" not in {name for name, _ in linear_mixers(linear_model("linear-taylor-conv0"))[0].named_children()}


def test_initial_decay_is_long_memory_and_survives_save_and_load(tmp_path):
    model = linear_model("hybrid-taylor-conv4")
    mixer = linear_mixers(model)[0]
    decay = torch.sigmoid(mixer.decay_bias.detach()) ** (1 / mixer.decay_temperature)  # a without the input term
    memory = 1 / (1 - decay)
    assert bool((memory >= 31.9).all()) and bool((memory <= 1024.1).all())
    assert memory[0].item() == pytest.approx(32, rel=1e-3) and memory[-1].item() == pytest.approx(1024, rel=1e-3)
    assert mixer.conv1d.weight.abs().max().item() <= 0.5  # PyTorch's depthwise default, not 0.02-normal

    with torch.no_grad():
        mixer.decay_bias.add_(0.25)
        mixer.conv1d.weight.mul_(0.5)
    model.save_pretrained(tmp_path)
    loaded = SonettForCausalLM.from_pretrained(tmp_path).eval()
    loaded_mixer = linear_mixers(loaded)[0]
    assert torch.equal(loaded_mixer.decay_bias, mixer.decay_bias)
    assert torch.equal(loaded_mixer.conv1d.weight, mixer.conv1d.weight)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_build_mask_keeps_the_padding_of_the_current_tokens():
    embeds = torch.zeros(2, 3, 32)
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    built = SonettLinearAttention.build_mask("linear_attention", inputs_embeds=embeds, attention_mask=mask)
    assert built.dtype == torch.bool and built.tolist() == [[False, True, True], [True, True, True]]
    ones = torch.ones(2, 5, dtype=torch.long)
    assert SonettLinearAttention.build_mask("linear_attention", inputs_embeds=embeds, attention_mask=ones) is None
    assert SonettLinearAttention.build_mask("linear_attention", inputs_embeds=embeds, attention_mask=None) is None
    four_d = torch.zeros(2, 1, 3, 5)
    assert SonettLinearAttention.build_mask("linear_attention", inputs_embeds=embeds, attention_mask=four_d) is None


@pytest.mark.parametrize("variant", ["linear-taylor-conv4", "hybrid-elu-conv0"])
def test_gradients_reach_every_mixer_parameter(variant):
    model = linear_model(variant).train()
    ids = random_ids(2, 10)
    rows = [random_ids(1, 10, seed=7)[0], random_ids(1, 6, seed=8)[0]]
    padded, attention_mask = left_pad(rows)
    model(ids, labels=ids).loss.backward()
    model(padded, attention_mask=attention_mask, labels=padded.masked_fill(attention_mask == 0, -100)).loss.backward()
    for mixer in linear_mixers(model):
        for name, parameter in mixer.named_parameters():
            assert parameter.grad is not None, name
            assert parameter.grad.abs().max().item() > 0, name


# ----------------------------------------------------------------------------------------------------------
# Invariant 1: incremental decoding equals the full forward
# ----------------------------------------------------------------------------------------------------------

PROMPT_LEN = 13


@variants
def test_prefill_then_decode_matches_full_forward(variant):
    model = linear_model(variant)
    ids = random_ids(2, PROMPT_LEN)
    prefill = 6
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(prefill, PROMPT_LEN):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-4
    assert cache.get_seq_length() == PROMPT_LEN


@variants
def test_chunked_prefill_matches_full_forward(variant):
    """Prefill in pieces that cut through the chunks (CHUNK = 4), then decode one token."""
    model = linear_model(variant)
    for seed, chunks in enumerate([(5, 4, 3), (1, 8, 4)]):
        ids = random_ids(2, sum(chunks), seed=3 + seed)
        nxt = random_ids(2, 1, seed=4)
        with torch.no_grad():
            full = model(torch.cat([ids, nxt], dim=1)).logits
            cache = SonettCache(model.config)
            pieces, start = [], 0
            for size in chunks:
                pieces.append(model(ids[:, start : start + size], cache=cache, use_cache=True).logits)
                start += size
            pieces.append(model(nxt, cache=cache, use_cache=True).logits)
        assert max_diff(torch.cat(pieces, dim=1), full) <= 1e-4, chunks


def test_decoding_reads_the_linear_state():
    assert_decoding_reads_the_cache(linear_model("linear-taylor-conv4"), random_ids(1, PROMPT_LEN))


# ----------------------------------------------------------------------------------------------------------
# Invariant 3: causality
# ----------------------------------------------------------------------------------------------------------


@variants
def test_causality(variant):
    model = linear_model(variant)
    length = 16
    ids = random_ids(1, length, seed=5)
    for t in (2, 9):
        changed = ids.clone()
        changed[0, t + 1] = (ids[0, t + 1] - 3 + 1) % (VOCAB - 3) + 3
        with torch.no_grad():
            a, b = model(ids).logits, model(changed).logits
        assert max_diff(a[:, : t + 1], b[:, : t + 1]) <= 1e-6
        diffs = (a[0, t + 1 :] - b[0, t + 1 :]).abs().amax(-1)
        assert bool((diffs > 1e-4).all()), diffs  # the state carries the change to every later token


# ----------------------------------------------------------------------------------------------------------
# Invariant 4: left padding
# ----------------------------------------------------------------------------------------------------------

ROW_LENGTHS = (12, 7, 3, 10)


def padded_batch():
    """Left-padded rows; the padding is an ordinary token (its embedding is not zero), so only the mask hides it."""
    rows = [random_ids(1, n, seed=20 + i)[0] for i, n in enumerate(ROW_LENGTHS)]
    input_ids, attention_mask = left_pad(rows, pad_id=VOCAB - 1)
    return rows, input_ids, attention_mask


@variants
def test_left_padded_batch_and_decode_match_rows_alone(variant):
    assert_padded_batch_matches_rows_alone(linear_model(variant), *padded_batch())


@pytest.mark.parametrize("variant", ["linear-taylor-conv0", "linear-identity-conv0"])
def test_masked_tokens_are_invisible_to_the_recurrence(variant):
    """Without a convolution, a masked token anywhere (even after a cached state) neither writes nor decays."""
    model = linear_model(variant)
    ids = random_ids(1, 9, seed=11)
    holes = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1]])
    with_holes = torch.full(holes.shape, VOCAB - 1)
    with_holes[holes.bool()] = ids[0]
    with torch.no_grad():
        alone = model(ids).logits[0]
        whole = model(with_holes, attention_mask=holes).logits[0]
        cache = model(with_holes[:, :5], attention_mask=holes[:, :5], use_cache=True).cache
        rest = model(with_holes[:, 5:], attention_mask=holes, cache=cache).logits[0]
    assert max_diff(whole[holes[0].bool()], alone) <= 1e-5
    assert max_diff(rest[holes[0, 5:].bool()], alone[4:]) <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# generate(): the cache gives the same tokens as recomputing everything
# ----------------------------------------------------------------------------------------------------------

STRATEGIES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 0},
    "beam-3": {"do_sample": False, "num_beams": 3},
}
NEW_TOKENS = 8


# greedy for every variant; sampling and beam search for one linear-only and two hybrid variants
GENERATE_CASES = [(variant, "greedy") for variant in VARIANTS] + [
    (variant, strategy)
    for variant in ("linear-taylor-conv4", "hybrid-taylor-conv4", "hybrid-elu-conv0")
    for strategy in ("sample", "beam-3")
]


@pytest.mark.parametrize(("variant", "strategy"), GENERATE_CASES)
def test_generate_with_and_without_cache_agree(variant, strategy):
    model = linear_model(variant)
    input_ids, attention_mask = left_pad([random_ids(1, 6, seed=41)[0], random_ids(1, 4, seed=42)[0]])

    def run(**kwargs):
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=PAD,
                **STRATEGIES[strategy],
                **kwargs,
            )

    with_cache, without_cache = run(), run(use_cache=False)
    assert with_cache.shape == (2, 6 + NEW_TOKENS)
    assert torch.equal(with_cache, without_cache)


# ----------------------------------------------------------------------------------------------------------
# The decoding state: constant size, fp32
# ----------------------------------------------------------------------------------------------------------


def linear_state_shapes(cache):
    return [
        (tuple(layer.recurrent_state.shape), None if layer.conv_state is None else tuple(layer.conv_state.shape))
        for layer in cache.layers
        if isinstance(layer, SonettLinearAttentionLayer)
    ]


@pytest.mark.parametrize("variant", ["linear-taylor-conv4", "linear-elu-conv4", "linear-identity-conv0"])
def test_cache_state_has_constant_size(variant):
    model = linear_model(variant)
    ids = random_ids(2, 200, seed=9)
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
        shapes, nbytes = linear_state_shapes(cache), cache.nbytes()
        model(ids[:, 10:150], cache=cache)
        for t in range(150, 200, 10):
            model(ids[:, t : t + 9], cache=cache)
            model(ids[:, t + 9 : t + 10], cache=cache)
    assert cache.get_seq_length() == 200
    assert linear_state_shapes(cache) == shapes
    assert cache.nbytes() == nbytes
    _, feature_map, conv_size = VARIANTS[variant]
    d_phi = linear_feature_size(feature_map, 4)
    assert shapes[0][0] == (2, 4, d_phi, 8)
    assert shapes[0][1] == (None if conv_size == 0 else (2, 2 * 4 * 4 + 4 * 8, conv_size - 1))


def test_recurrent_state_is_fp32_in_a_bfloat16_model():
    model = linear_model("hybrid-taylor-conv4").to(torch.bfloat16)
    ids = random_ids(2, 9)
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:], cache=out.cache)
    for logits in (out.logits, step.logits):
        assert logits.dtype == torch.bfloat16
        assert bool(torch.isfinite(logits).all())
    layer = out.cache.layers[0]
    assert isinstance(layer, SonettLinearAttentionLayer)
    assert layer.recurrent_state.dtype == torch.float32
    assert layer.conv_state.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# Optional flash-linear-attention kernels (the only test allowed to skip)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not torch.cuda.is_available() or not fla_available(), reason="needs CUDA and flash-linear-attention"
)
def test_fla_kernels_match_the_pytorch_reference():
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, heads, seq, d_f, head_dim = 2, 4, 100, 16, 64
    q = 0.5 * torch.randn(batch, heads, seq, d_f, device="cuda", generator=generator)
    k = 0.5 * torch.randn(batch, heads, seq, d_f, device="cuda", generator=generator)
    q_feat, k_feat = apply_feature_map(q, "taylor"), apply_feature_map(k, "taylor")
    v = torch.randn(batch, heads, seq, head_dim, device="cuda", generator=generator)
    log_decay = F.logsigmoid(torch.randn(batch, heads, seq, device="cuda", generator=generator) + 3) / 16
    state = torch.randn(batch, heads, q_feat.shape[-1], head_dim, device="cuda", generator=generator)

    def close(got, expected):
        return max_diff(got.float(), expected) <= 1e-2 * expected.abs().max().item()

    reference, reference_state = chunk_linear_attention(q_feat, k_feat, v, log_decay, 64, state)
    out, out_state = fla_linear_attention(q_feat, k_feat, v, log_decay, state)
    assert close(out, reference) and close(out_state, reference_state)
    assert out_state.dtype == torch.float32
    step = slice(0, 1)
    reference, reference_state = recurrent_linear_attention(
        q_feat[:, :, step], k_feat[:, :, step], v[:, :, step], log_decay[:, :, step], state
    )
    out, out_state = fla_linear_attention(
        q_feat[:, :, step], k_feat[:, :, step], v[:, :, step], log_decay[:, :, step], state, recurrent=True
    )
    assert close(out, reference) and close(out_state, reference_state)

    # and through the model: the fla dispatch against the PyTorch path, prefill and decode
    model = linear_model("hybrid-taylor-conv4").cuda()
    ids = random_ids(2, 20).cuda()
    with torch.no_grad():
        fused = model(ids).logits
        model.config.linear_use_fla = False
        plain = model(ids).logits
    assert close(fused, plain)
