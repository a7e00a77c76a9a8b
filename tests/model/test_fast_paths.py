"""docs/design.md, invariant 11, for linear_attention: the fast path (feature scores from the d_f-wide products,
chunk states in one product, the convolution's decode and packed forms, one fused projection, the in-place decode
step, the segmented no-grad prefill) equals the reference forms (`chunk_linear_attention`,
`recurrent_linear_attention`, `F.conv1d`) in outputs, states and gradients, alone and through the model."""

import pytest
import torch
from helpers_model import PAD, left_pad, max_diff, random_ids, tiny_model
from torch.nn import functional as F

import sonett.model.linear_attention_sonett as linear
from sonett.model.linear_attention_sonett import (
    apply_feature_map,
    chunk_linear_attention,
    chunk_states,
    fused_chunk_linear_attention,
    recurrent_linear_attention,
    recurrent_step,
)

FEATURE_MAPS = ["taylor", "elu", "identity"]
TOLERANCE = 1e-5
# Through a model, fp32 rounding differences of the two forms (1e-7 relative; the forms agree to 1e-15 in fp64) grow
# through the norms and the unnormalised identity feature map: logits and gradients are compared at this tolerance.
MODEL_TOLERANCE = 5e-4


def kernel_inputs(feature_map, with_state, seed=0, seq=13, d_f=3, head_dim=4):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, seq, d_f, generator=generator) for _ in range(2))
    v = torch.randn(2, 2, seq, head_dim, generator=generator)
    log_decay = F.logsigmoid(2 * torch.randn(2, 2, seq, generator=generator))
    state = None
    if with_state:  # a state the layer could have written: symmetric in its second-order block, as φ(k)ᵀ v is
        keys = torch.randn(2, 2, 5, d_f, generator=generator)
        state = apply_feature_map(keys, feature_map).transpose(-1, -2) @ torch.randn(2, 2, 5, head_dim)
    tensors = [t.requires_grad_(True) for t in (q, k, v, log_decay, state) if t is not None]
    return (q, k, v, log_decay, state), tensors


def outputs_and_grads(fn, tensors, seed=1):
    out, state = fn()
    generator = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=generator)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=generator)).sum()
    return [out, state, *torch.autograd.grad(loss, tensors)]


def assert_all_close(got, want, tolerance=TOLERANCE):
    for index, (a, b) in enumerate(zip(got, want)):
        scale = max(b.abs().max().item(), 1.0)
        assert max_diff(a, b) <= tolerance * scale, index


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 5, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_chunked_form_equals_the_reference(feature_map, with_state, chunk_size, packed):
    (q, k, v, log_decay, state), tensors = kernel_inputs(feature_map, with_state)
    resets = None
    if packed:
        resets = torch.zeros(2, q.shape[2], dtype=torch.bool)
        resets[:, 0] = True
        resets[0, 5] = resets[1, 9] = resets[1, 10] = True

    def reference():
        features = (apply_feature_map(x, feature_map) for x in (q, k))
        return chunk_linear_attention(*features, v, log_decay, chunk_size, state, resets=resets)

    def fused():
        return fused_chunk_linear_attention(q, k, v, log_decay, feature_map, chunk_size, state, resets=resets)

    assert_all_close(outputs_and_grads(fused, tensors), outputs_and_grads(reference, tensors))


def test_taylor_scores_never_build_the_wide_features(monkeypatch):
    # the intra-chunk weights come from d_f-wide products: no (chunk x d_phi) @ (d_phi x chunk) product is formed
    (q, k, v, log_decay, _), _ = kernel_inputs("taylor", False, seq=16, d_f=3)
    shapes = []
    original = torch.Tensor.__matmul__

    def record(a, b):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", record)
    fused_chunk_linear_attention(q, k, v, log_decay, "taylor", 8)
    d_phi = 1 + 3 + 9
    assert not any(a[-1] == d_phi and b[-1] == 8 for a, b in shapes), shapes


def test_chunk_states_equal_the_loop_over_chunks():
    generator = torch.Generator().manual_seed(3)
    chunk_kv = torch.randn(2, 3, 6, 5, 4, generator=generator)
    chunk_log_decay = -3 * torch.rand(2, 3, 6, generator=generator)
    state = torch.randn(2, 3, 5, 4, generator=generator)
    expected = [state]
    for index in range(6):
        expected.append(expected[-1] * chunk_log_decay[:, :, index, None, None].exp() + chunk_kv[:, :, index])
    assert max_diff(chunk_states(chunk_kv, chunk_log_decay, state), torch.stack(expected, dim=2)) <= 1e-5


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_decode_step_equals_the_recurrent_form_and_updates_the_state_in_place(feature_map):
    (q, k, v, log_decay, state), _ = kernel_inputs(feature_map, True, seq=1)
    q, k, v, log_decay, state = (t.detach() for t in (q, k, v, log_decay, state))
    features = (apply_feature_map(x, feature_map) for x in (q, k))
    want_out, want_state = recurrent_linear_attention(*features, v, log_decay, state.clone())
    with torch.no_grad():
        buffer = state.clone()
        out, new_state = recurrent_step(q, k, v, log_decay, feature_map, buffer)
    assert new_state.data_ptr() == buffer.data_ptr()  # written where it lies: no new state per token
    assert max_diff(out, want_out) <= TOLERANCE and max_diff(new_state, want_state) <= TOLERANCE
    # with gradients it leaves the given state alone and differentiates like the reference
    grad_state = state.clone().requires_grad_(True)
    got = recurrent_step(q, k, v, log_decay, feature_map, grad_state)
    assert torch.equal(grad_state, state)
    assert max_diff(got[1], want_state) <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# Through the model: `mixer.reference_path = True` runs the reference forms
# ----------------------------------------------------------------------------------------------------------

VARIANTS = {
    "taylor-conv4": ("taylor", 4),
    "elu-conv0": ("elu", 0),
    "identity-conv4": ("identity", 4),
}
LAYERS = ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]


def model_pair(variant, **overrides):
    feature_map, conv_size = VARIANTS[variant]
    kwargs = {
        "layer_types": LAYERS,
        "num_hidden_layers": len(LAYERS),
        "linear_feature_map": feature_map,
        "linear_conv_size": conv_size,
        "linear_feature_dim": 4,
        "linear_chunk_size": 4,
        **overrides,
    }
    fast, reference = tiny_model("full", **kwargs), tiny_model("full", **kwargs)
    for layer in reference.model.layers:
        if layer.kind == "linear_attention":
            layer.mixer.reference_path = True
    return fast, reference


def loss_and_grads(model, ids, **kwargs):
    model.zero_grad()
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    return [out.logits, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_training_logits_and_gradients_equal_the_reference(variant, padded):
    fast, reference = model_pair(variant)
    if padded:
        ids, mask = left_pad([random_ids(1, 19, seed=5)[0], random_ids(1, 11, seed=6)[0]])
        kwargs = {"attention_mask": mask}
    else:
        ids, kwargs = random_ids(2, 19, seed=5), {}
    got = loss_and_grads(fast.train(), ids, **kwargs)
    assert_all_close(got, loss_and_grads(reference.train(), ids, **kwargs), MODEL_TOLERANCE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_rows_equal_the_reference(variant):
    fast, reference = model_pair(variant)
    ids = random_ids(1, 17, seed=7)
    positions = torch.cat([torch.arange(6), torch.arange(11)])[None]
    got = loss_and_grads(fast.train(), ids, position_ids=positions)
    assert_all_close(got, loss_and_grads(reference.train(), ids, position_ids=positions), MODEL_TOLERANCE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_decode_equal_the_reference(variant):
    fast, reference = model_pair(variant)
    ids, mask = left_pad([random_ids(1, 9, seed=8)[0], random_ids(1, 5, seed=9)[0]])
    following = random_ids(2, 4, seed=10)
    logits = {}
    with torch.no_grad():
        for name, model in (("fast", fast), ("reference", reference)):
            step_mask = mask
            out = model(ids, attention_mask=step_mask, use_cache=True)
            cache, steps = out.cache, [out.logits]
            for j in range(following.shape[1]):
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=step_mask.dtype)], dim=1)
                steps.append(model(following[:, j : j + 1], attention_mask=step_mask, cache=cache).logits)
            logits[name] = steps
    assert_all_close(logits["fast"], logits["reference"], MODEL_TOLERANCE)


def test_greedy_generation_equals_the_reference():
    fast, reference = model_pair("taylor-conv4")
    ids, mask = left_pad([random_ids(1, 9, seed=11)[0], random_ids(1, 5, seed=12)[0]])
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_decode_steps_keep_the_linear_state_buffers():
    fast, _ = model_pair("taylor-conv4")
    with torch.no_grad():
        out = fast(random_ids(1, 9, seed=13), use_cache=True)
        cache = out.cache
        layer = cache.layers[0]
        address = layer.recurrent_state.data_ptr()
        for token in random_ids(1, 3, seed=14)[0]:
            fast(token.view(1, 1), cache=cache)
    assert layer.recurrent_state.data_ptr() == address
    assert layer.seq_length == 12


def test_segmented_prefill_equals_one_pass(monkeypatch):
    fast, reference = model_pair("taylor-conv4")
    ids = random_ids(2, 37, seed=15)
    with torch.no_grad():
        want = reference(ids, use_cache=True)
        monkeypatch.setattr(linear, "PREFILL_SEGMENT", 8)  # two chunks of 4 per segment: five segments
        got = fast(ids, use_cache=True)
    assert max_diff(got.logits, want.logits) <= TOLERANCE
    for index in (0, 2):
        assert max_diff(got.cache.layers[index].recurrent_state, want.cache.layers[index].recurrent_state) <= 1e-4


def test_segments_are_used_only_without_gradients(monkeypatch):
    calls = []
    original = linear.fused_chunk_linear_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(linear, "fused_chunk_linear_attention", counting)
    monkeypatch.setattr(linear, "PREFILL_SEGMENT", 8)
    fast, _ = model_pair("taylor-conv4")
    ids = random_ids(1, 20, seed=16)
    with torch.no_grad():
        fast(ids)
    assert calls == [8, 8, 4, 8, 8, 4]  # two linear layers, each in segments of 8 tokens
    calls.clear()
    fast(ids)
    assert calls == [20, 20]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("length", [1, 9])
def test_convolution_forms_equal_the_reference(packed, length):
    fast, _ = model_pair("taylor-conv4")
    mixer = fast.model.layers[0].mixer
    generator = torch.Generator().manual_seed(17)
    x = torch.randn(2, length, mixer.conv_channels, generator=generator, requires_grad=True)
    state = torch.randn(2, mixer.conv_channels, 3, generator=generator)
    offsets = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 0, 1, 2, 3]])[:, :length] if packed else None
    got = mixer.short_conv(x, None if packed else state, offsets)
    want = mixer.reference_short_conv(x, None if packed else state, offsets)
    assert max_diff(got[0], want[0]) <= TOLERANCE and torch.equal(got[1], want[1])
    grads = [torch.autograd.grad(out[0].square().sum(), (x, mixer.conv1d.weight)) for out in (got, want)]
    assert_all_close(grads[0], grads[1])


def test_adapter_wrapped_projections_run_their_own_forward():
    peft = pytest.importorskip("peft")
    fast, reference = model_pair("taylor-conv4")
    ids = random_ids(1, 12, seed=18)
    with torch.no_grad():
        base = fast(ids).logits
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False, r=2)
    fast, reference = peft.get_peft_model(fast, config), peft.get_peft_model(reference, config)
    reference.load_state_dict(fast.state_dict())
    with torch.no_grad():
        adapted, want = fast(ids).logits, reference(ids).logits
    assert max_diff(adapted, base) > 1e-3  # the adapter acts: the fused projection did not bypass it
    assert max_diff(adapted, want) <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# A long no-grad forward of a constant-state model runs segment by segment through the cache
# ----------------------------------------------------------------------------------------------------------

CONSTANT_LAYERS = ["linear_attention", "sliding_attention", "memory_attention"]


def constant_model(**overrides):
    kwargs = {
        "layer_types": CONSTANT_LAYERS,
        "num_hidden_layers": 3,
        "linear_feature_dim": 4,
        "linear_chunk_size": 4,
        "memory_chunk_size": 4,
        **overrides,
    }
    return tiny_model("full", **kwargs)


@pytest.fixture
def short_segments(monkeypatch):
    import sonett.model.modeling_sonett as modeling

    monkeypatch.setattr(modeling, "PREFILL_SEGMENT_TOKENS", 8)
    calls = []
    original = modeling.SonettModel._segmented_prefill

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling.SonettModel, "_segmented_prefill", counting)
    return calls


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_segmented_forward_equals_the_one_pass_forward(short_segments, padded):
    model = constant_model()
    if padded:
        ids, mask = left_pad([random_ids(1, 37, seed=19)[0], random_ids(1, 30, seed=20)[0]])
    else:
        ids, mask = random_ids(2, 37, seed=19), None
    with torch.enable_grad():  # gradients on: the one-pass path
        want = model(ids, attention_mask=mask, use_cache=True)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, use_cache=True)
        following = random_ids(2, 1, seed=21)
        step_mask = None if mask is None else torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        got_next = model(following, attention_mask=step_mask, cache=got.cache).logits
        want_next = model(following, attention_mask=step_mask, cache=want.cache).logits
    assert short_segments == [1]
    real = slice(None) if mask is None else mask.bool()
    assert max_diff(got.logits[real], want.logits.detach()[real]) <= 1e-4  # docs/design.md, invariant 1
    assert max_diff(got_next, want_next) <= 1e-4


def test_segmented_forward_without_a_cache_returns_none_and_keeps_logits_to_keep(short_segments):
    model = constant_model()
    ids = random_ids(1, 30, seed=22)
    with torch.no_grad():
        out = model(ids, use_cache=False, logits_to_keep=1)
        whole = model(ids, use_cache=False).logits
    assert short_segments == [1, 1]
    assert out.cache is None and out.logits.shape == (1, 1, model.config.vocab_size)
    assert max_diff(out.logits[:, -1], whole[:, -1]) <= 1e-6


def test_hidden_states_full_attention_and_short_inputs_take_the_one_pass_path(short_segments):
    ids = random_ids(1, 30, seed=23)
    with torch.no_grad():
        constant_model()(ids, output_hidden_states=True)
        constant_model()(ids[:, :16])  # not more than two segments
        tiny_model("full", layer_types=[*CONSTANT_LAYERS, "full_attention"], num_hidden_layers=4)(ids)
    assert short_segments == []


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_long_continuation_of_a_full_window_attends_blockwise_and_exactly(monkeypatch, implementation):
    import sonett.model.attention_sonett as attention

    calls = []
    original = attention.blocked_local_attention

    def counting(module, query, key, value, *args, **kwargs):
        calls.append(key.shape[2] - query.shape[2])  # the cached keys before the queries
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(attention, "blocked_local_attention", counting)
    model = constant_model(attn_implementation=implementation)
    ids = random_ids(2, 31, seed=24)
    with torch.no_grad():
        want = model(ids).logits
        cache = model(ids[:, :10], use_cache=True).cache
        got = model(ids[:, 10:], cache=cache).logits
    assert 3 in calls  # window 4: the continuation's keys start with the 3 cached ones
    assert max_diff(got, want[:, 10:]) <= 1e-5
