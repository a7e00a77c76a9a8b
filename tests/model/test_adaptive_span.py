"""Learned dynamic windows: adaptive attention spans in `sliding_attention` layers."""

import pytest
import torch
from helpers_model import random_ids, tiny_config
from torch import nn

from sonett import SonettCache, SonettForCausalLM

WINDOW, RAMP = 8, 2


def span_model(layer_types=("sliding_attention",), seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(
        "full",
        layer_types=list(layer_types),
        num_hidden_layers=len(layer_types),
        sliding_window=WINDOW,
        adaptive_span=True,
        adaptive_span_ramp=RAMP,
        **overrides,
    )
    return SonettForCausalLM(config).eval()


def set_spans(model, spans_in_tokens):
    with torch.no_grad():
        for layer in model.model.layers:
            if getattr(layer.mixer, "adaptive_span", False):
                fraction = torch.tensor(spans_in_tokens, dtype=torch.float) / WINDOW
                layer.mixer.span_logit.copy_(torch.log(fraction / (1 - fraction)))


def test_spans_are_reported_per_layer_and_head():
    model = span_model(("sliding_attention", "full_attention", "sliding_attention"))
    spans = model.attention_spans()
    assert sorted(spans) == [0, 2]
    for value in spans.values():
        assert value.shape == (model.config.num_attention_heads,)
        assert torch.allclose(value, torch.full_like(value, WINDOW * model.config.adaptive_span_init))


def test_short_span_stops_seeing_far_tokens():
    model = span_model()
    set_spans(model, [1.0, 1.5, 0.5, 1.9])  # reach = ceil(1.9 + 2) = 4 keys: distances 0..3
    ids = random_ids(1, 12)
    with torch.no_grad():
        base = model(ids).logits[0, -1]
        far = ids.clone()
        far[0, -5] = (far[0, -5] + 1) % 90 + 3  # distance 4: outside every ramp
        near = ids.clone()
        near[0, -2] = (near[0, -2] + 1) % 90 + 3  # distance 1: inside
        assert torch.equal(model(far).logits[0, -1], base)
        assert (model(near).logits[0, -1] - base).abs().max() > 1e-3


def test_ramp_weights_partially_visible_keys():
    """A key inside the ramp (0 < m < 1) changes the output less than without the span mask, but does change it."""
    model = span_model()
    set_spans(model, [2.0, 2.0, 2.0, 2.0])  # m(3) = (2 + 2 - 3) / 2 = 0.5, m(4) = 0
    ids = random_ids(1, 10)
    changed = ids.clone()
    changed[0, -4] = (changed[0, -4] + 7) % 90 + 3  # distance 3
    with torch.no_grad():
        assert (model(changed).logits[0, -1] - model(ids).logits[0, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_trimmed_cache_equals_full_forward_and_untrimmed_cache(attn):
    model = span_model(("sliding_attention", "full_attention", "sliding_attention"))
    model.set_attn_implementation(attn)
    set_spans(model, [0.5, 1.0, 2.5, 1.5])  # reach = ceil(2.5 + 2) = 5 < WINDOW
    ids = random_ids(2, 15)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        trimmed = out.cache
        untrimmed = SonettCache(model.config)
        reference = model(ids[:, :6], cache=untrimmed, use_cache=True).logits
        steps, reference_steps = [out.logits], [reference]
        for t in range(6, 15):
            steps.append(model(ids[:, t : t + 1], cache=trimmed).logits)
            reference_steps.append(model(ids[:, t : t + 1], cache=untrimmed).logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    assert (torch.cat(reference_steps, 1) - full).abs().max() <= 1e-4
    assert trimmed.layer_windows[0] == 5 and untrimmed.layer_windows[0] == WINDOW
    assert trimmed.layers[0].keys.shape[-2] == 4
    assert untrimmed.layers[0].keys.shape[-2] == WINDOW - 1
    assert trimmed.nbytes() < untrimmed.nbytes()


def test_generate_with_trimmed_cache_matches_no_cache():
    model = span_model(("sliding_attention", "full_attention"))
    set_spans(model, [0.5, 1.0, 2.5, 1.5])
    ids = random_ids(2, 7)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False)
        beams = model.generate(ids, max_new_tokens=6, num_beams=3, pad_token_id=0)
        beams_uncached = model.generate(ids, max_new_tokens=6, num_beams=3, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(beams, beams_uncached)


def test_span_penalty_is_added_in_training_only():
    model = span_model(("sliding_attention", "sliding_attention"), adaptive_span_loss_coef=0.01)
    ids = random_ids(2, 9)
    model.eval()
    with torch.no_grad():
        eval_loss = model(ids, labels=ids).loss
        model.train()
        train_loss = model(ids, labels=ids).loss
    spans = torch.cat(list(model.attention_spans().values()))
    assert train_loss.item() == pytest.approx(eval_loss.item() + 0.01 * spans.mean().item(), rel=1e-6)


def test_spans_receive_gradients_from_the_language_model_loss():
    model = span_model(("sliding_attention",), adaptive_span_loss_coef=0.0)
    set_spans(model, [2.0, 3.0, 4.0, 5.0])  # every head's ramp covers keys in the sequence
    model.train()
    ids = random_ids(2, 12)
    model(ids, labels=ids).loss.backward()
    grad = model.model.layers[0].mixer.span_logit.grad
    assert grad is not None and grad.abs().min() > 0


def test_penalty_shrinks_spans_under_gradient_descent():
    model = span_model(("sliding_attention",), adaptive_span_loss_coef=1.0)
    model.train()
    optimizer = torch.optim.SGD([model.model.layers[0].mixer.span_logit], lr=0.5)
    before = model.attention_spans()[0].clone()
    for _ in range(5):
        optimizer.zero_grad()
        ids = random_ids(2, 12)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    assert (model.attention_spans()[0] < before).all()


def test_adaptive_span_refuses_flex_attention():
    model = span_model()
    model.set_attn_implementation("flex_attention")
    with torch.no_grad(), pytest.raises(ValueError, match="adaptive_span needs attn_implementation"):
        model(random_ids(1, 5))


def test_span_parameter_survives_save_and_load(tmp_path):
    model = span_model(("sliding_attention", "full_attention"))
    set_spans(model, [0.5, 1.0, 2.5, 1.5])
    model.save_pretrained(tmp_path)
    reloaded = SonettForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded.attention_spans()[0], model.attention_spans()[0])
    assert isinstance(reloaded.model.layers[0].mixer.span_logit, nn.Parameter)


def test_span_penalty_is_shared_across_accumulated_micro_batches():
    """With `num_items_in_batch`, two micro-batches add up to one penalty, as one large batch would."""
    model = span_model(("sliding_attention",), adaptive_span_loss_coef=0.01)
    model.train()
    ids = random_ids(4, 9)
    labels = ids.clone()
    labels[:1, :4] = -100
    total = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        whole = model(ids, labels=labels, num_items_in_batch=total).loss
        halves = sum(
            model(ids[part], labels=labels[part], num_items_in_batch=total).loss for part in (slice(0, 2), slice(2, 4))
        )
    assert halves.item() == pytest.approx(whole.item(), rel=1e-5)
