"""`SonettPreTrainedModel._init_weights`: one method, dispatching on module type, sets every parameter.

The expected rules below are those of the per-module `reset_sonett_parameters` methods and init flags that the
method replaced: closed gates, the log-spaced decay bias, the adaptive-span logit, the zero upsampling of an
hourglass, LayerScale 0.1, fan-in (He) stem convolutions, PyTorch's depthwise-conv default and normal resampler
queries. Every test first overwrites all parameters with a sentinel, then re-runs `_init_weights` over the modules
through `PreTrainedModel.initialize_weights`, so a rule left in a constructor (or one transformers skips) would show.
"""

import math
import pathlib
import re

import pytest
import torch
from helpers_model import tiny_config
from torch import nn

import sonett
from sonett import SonettForCausalLM, SonettForConditionalGeneration, SonettForSequenceClassification
from sonett.model.linear_attention_sonett import initial_decay_bias

SENTINEL = 7.0
ALL_KINDS = ["sliding_attention", "full_attention", "linear_attention", "memory_attention", "full_attention"]
HIERARCHY = {"shorten_factor": 2, "start_layer": 1, "end_layer": 3}
VISION = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}


def text_model(**overrides) -> SonettForCausalLM:
    torch.manual_seed(0)
    return SonettForCausalLM(tiny_config("mixed", num_hidden_layers=5, layer_types=list(ALL_KINDS), **overrides))


def vision_model(**vision) -> SonettForConditionalGeneration:
    text = SonettForCausalLM(tiny_config("mixed"))
    return SonettForConditionalGeneration.from_text_model(
        text, cross_attention_layers=[0, 2], vision_config={**VISION, **vision}, image_token_id=5
    )


def reinitialise(model: nn.Module) -> nn.Module:
    """Overwrite every parameter with SENTINEL, then initialise the model again the way transformers does it.

    `initialize_weights` (what `post_init` and `from_pretrained` run) visits the modules children first and, for
    custom code, skips a module without parameters of its own, so a rule written for such a parent never runs.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(SENTINEL)
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()
    return model


def assert_std(tensor: torch.Tensor, expected: float, rel: float = 0.2) -> None:
    assert tensor.float().std().item() == pytest.approx(expected, rel=rel)


def test_every_parameter_is_set_by_init_weights():
    for model in (text_model(adaptive_span=True, hierarchy=HIERARCHY), vision_model(stem="convolutional")):
        reinitialise(model)
        untouched = [name for name, p in model.named_parameters() if bool((p == SENTINEL).all())]
        assert untouched == []


def test_mixer_parameters_follow_their_rules():
    model = reinitialise(text_model(adaptive_span=True))
    config = model.config
    heads = config.num_attention_heads
    span_logit = math.log(config.adaptive_span_init / (1 - config.adaptive_span_init))
    for layer in model.model.layers:
        mixer = layer.mixer
        if layer.kind == "sliding_attention":  # adaptive span: every head starts at adaptive_span_init
            torch.testing.assert_close(mixer.span_logit, torch.full((heads,), span_logit), rtol=0, atol=0)
        if layer.kind == "memory_attention":  # closed gate: the memory read starts off
            assert torch.equal(mixer.gate, torch.zeros(heads))
            assert not hasattr(mixer, "span_logit")
        if layer.kind == "linear_attention":
            assert torch.equal(mixer.decay_bias, initial_decay_bias(heads))  # memories log-spaced over the range
            bound = 1.0 / math.sqrt(config.linear_conv_size)  # PyTorch's depthwise default: U(-1/sqrt(k), 1/sqrt(k))
            weight = mixer.conv1d.weight
            assert weight.abs().max().item() <= bound
            assert_std(weight, bound / math.sqrt(3))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert_std(getattr(mixer, name).weight, config.initializer_range)
    rotary = model.model.rotary_emb
    for kind in rotary.kinds:
        inv_freq, _ = rotary.compute_inv_freq(kind)
        assert torch.equal(getattr(rotary, f"{kind}_inv_freq"), inv_freq)
        assert torch.equal(getattr(rotary, f"{kind}_original_inv_freq"), inv_freq)


@pytest.mark.parametrize("upsampling", ["repeat", "linear"])
def test_hourglass_upsampling_starts_at_zero(upsampling):
    model = reinitialise(text_model(hierarchy={**HIERARCHY, "upsampling": upsampling}))
    hourglass = model.model.hourglass
    assert torch.equal(hourglass.upsample_proj.weight, torch.zeros_like(hourglass.upsample_proj.weight))
    assert_std(hourglass.shorten_proj.weight, model.config.initializer_range)


def test_vision_parameters_follow_their_rules():
    model = reinitialise(vision_model(stem="convolutional", num_visual_tokens=4))
    std = model.config.initializer_range
    assert len(model.model.cross_attention_blocks) == 2
    for block in model.model.cross_attention_blocks.values():
        assert torch.equal(block.attn_gate, torch.zeros(1)) and torch.equal(block.mlp_gate, torch.zeros(1))
    vision = model.vision_model
    for layer in vision.layers:
        assert torch.equal(layer.attn_scale, torch.full_like(layer.attn_scale, 0.1))
        assert torch.equal(layer.mlp_scale, torch.full_like(layer.mlp_scale, 0.1))
    stem = vision.patch_embedding
    for conv in stem.convs:  # He init for the GELU (relu gain) convolutions, zero bias
        fan_in = conv.weight[0].numel()
        assert_std(conv.weight, math.sqrt(2.0 / fan_in))
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert_std(stem.proj.weight, math.sqrt(1.0 / stem.proj.weight[0].numel()))
    assert_std(model.multi_modal_projector.resampler_queries, std, rel=0.3)


def test_patchify_stem_keeps_the_normal_init():
    model = reinitialise(vision_model())
    assert model.multi_modal_projector.resampler_queries is None
    assert_std(model.vision_model.patch_embedding.weight, model.config.initializer_range)


def perturbed(model: nn.Module) -> nn.Module:
    """Every parameter moved away from anything an init rule gives (so a re-initialised weight shows)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model


@pytest.mark.parametrize("build", ["text", "vision"])
def test_from_pretrained_keeps_every_loaded_weight(tmp_path, build):
    if build == "text":
        model = perturbed(text_model(adaptive_span=True, hierarchy=HIERARCHY))
    else:
        model = perturbed(vision_model(stem="convolutional", num_visual_tokens=4))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys()
    changed = [name for name in saved if not torch.equal(saved[name], got[name])]
    assert changed == []


def test_a_missing_head_is_initialised_and_the_rest_kept(tmp_path):
    model = perturbed(text_model(adaptive_span=True, hierarchy=HIERARCHY))
    model.save_pretrained(tmp_path)
    classifier = SonettForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    body = {f"model.{name}": tensor for name, tensor in model.model.state_dict().items()}
    got = classifier.state_dict()
    assert [name for name in body if not torch.equal(body[name], got[name])] == []
    score = classifier.score.weight
    assert score.shape == (3, model.config.hidden_size)
    assert_std(score, model.config.initializer_range, rel=0.3)


def test_init_weights_twice_changes_nothing():
    for model in (text_model(adaptive_span=True, hierarchy=HIERARCHY), vision_model(stem="convolutional")):
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        model.init_weights()
        model.init_weights()
        assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_no_module_keeps_its_own_init_hook():
    """Initialisation lives in `_init_weights` only: no duck-typed per-module reset methods or init flags."""
    package = pathlib.Path(sonett.__file__).parent
    pattern = re.compile(r"reset_sonett_parameters|sonett_zero_init|sonett_fan_in_init")
    offenders = [str(path) for path in package.rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []
