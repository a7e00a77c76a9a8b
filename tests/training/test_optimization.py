"""One optimizer/scheduler builder (`sonett.training.optimization`) for every hand-written loop, with the parameter
roles the model declares (`SonettPreTrainedModel.parameter_roles`), as nanoGPT's `configure_optimizers`."""

import math
import re
from pathlib import Path

import pytest
import torch
from helpers_model import tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from sonett import SonettForCausalLM, SonettForConditionalGeneration
from sonett.training.optimization import (
    CROSS_ATTENTION_GATE,
    create_optimizer,
    create_scheduler,
    parameter_groups,
)

PACKAGE = Path(__file__).resolve().parents[2] / "modeling" / "sonett"
EVERY_KIND = ["full_attention", "sliding_attention", "linear_attention", "memory_attention"]
VISION = {
    "image_size": 8,
    "patch_size": 4,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
PROJECTIONS = ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.o_proj", "mlp.gate_proj", "mlp.up_proj")
PROJECTIONS += ("mlp.down_proj",)


def text_model() -> SonettForCausalLM:
    torch.manual_seed(0)
    config = tiny_config("mixed", num_hidden_layers=4, layer_types=EVERY_KIND, adaptive_span=True)
    return SonettForCausalLM(config)


def vision_model() -> SonettForConditionalGeneration:
    return SonettForConditionalGeneration.from_text_model(text_model(), [1], vision_config=VISION)


def group_names(model: torch.nn.Module, groups: list[dict]) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in groups]


def test_every_layer_kind_and_the_adaptive_span_get_their_role():
    model = text_model()
    groups = parameter_groups(model, 0.1, gate_lr=0.5)
    assert [(g["weight_decay"], g.get("lr")) for g in groups] == [(0.1, None), (0.0, None), (0.0, 0.5)]
    decay, no_decay, gates = group_names(model, groups)
    layers = [f"model.layers.{i}." for i in range(4)]
    assert decay == {"model.embed_tokens.weight"} | {f"{layer}{p}.weight" for layer in layers for p in PROJECTIONS} | {
        f"{layers[2]}mixer.{p}.weight" for p in ("gate_proj", "decay_proj", "conv1d")
    }
    assert no_decay == {"model.norm.weight"} | {
        f"{layer}{norm}.weight" for layer in layers for norm in ("input_layernorm", "post_attention_layernorm")
    } | {f"{layers[1]}mixer.span_logit", f"{layers[2]}mixer.decay_bias", f"{layers[2]}mixer.norm.weight"}
    assert gates == {f"{layers[3]}mixer.gate"}
    # without a gate learning rate the gates train in the no-decay group
    assert group_names(model, parameter_groups(model, 0.1)) == [decay, no_decay | gates]


def test_the_vision_recipe_gives_only_the_cross_attention_gates_their_rate():
    model = vision_model()
    decay, no_decay, gates = group_names(model, parameter_groups(model, 0.01, 0.2, gate_roles=(CROSS_ATTENTION_GATE,)))
    block = "model.cross_attention_blocks.1."
    assert gates == {f"{block}attn_gate", f"{block}mlp_gate"}
    assert "model.layers.3.mixer.gate" in no_decay
    assert {f"{block}cross_attn.{p}_norm.weight" for p in "qk"} <= no_decay
    new_decay = {n for n in decay if not n.startswith("model.layers.") and n != "model.embed_tokens.weight"}
    assert new_decay == {f"{block}cross_attn.{p}_proj.weight" for p in "qkvo"} | {
        f"{block}mlp.{p}_proj.weight" for p in ("gate", "up", "down")
    } | {
        "vision_model.patch_embedding.weight",
        "vision_model.row_embedding.weight",
        "vision_model.column_embedding.weight",
        "multi_modal_projector.up_proj.weight",
        "multi_modal_projector.down_proj.weight",
    } | {f"vision_model.layers.0.{p}.weight" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")} | {
        f"vision_model.layers.0.{p}.weight" for p in ("self_attn.o_proj", "up_proj", "down_proj")
    }
    assert all(n.endswith(("bias", "norm.weight", "norm1.weight", "norm2.weight", "_scale", "gate", "span_logit",
                           "decay_bias")) for n in no_decay)  # fmt: skip


def test_a_peft_wrapped_model_keeps_the_roles_of_its_base_model():
    from sonett.training.vision import add_text_lora

    model = add_text_lora(vision_model(), rank=2, trainable_token_ids=[3, 4])
    decay, no_decay, gates = group_names(model, parameter_groups(model, 0.01, 0.2, gate_roles=(CROSS_ATTENTION_GATE,)))
    prefix = "base_model.model.model.cross_attention_blocks.1."
    assert gates == {f"{prefix}attn_gate", f"{prefix}mlp_gate"}
    assert any(".lora_A." in n for n in decay) and any("trainable_tokens_delta" in n for n in decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay | gates == trainable and not decay & no_decay
    assert not any(n.startswith("base_model.model.model.layers.") and "lora" not in n for n in trainable)


def test_a_model_that_declares_nothing_gets_the_default_rule():
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    groups = parameter_groups(model, 0.1, gate_lr=0.5)
    assert len(groups) == 2  # nothing is a gate
    decay, no_decay = group_names(model, groups)
    assert no_decay == {n for n, _ in model.named_parameters() if "norm" in n}
    assert decay == {n for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n}


def test_the_optimizer_and_schedule_keep_the_recipe_settings():
    model = text_model()
    optimizer = create_optimizer(parameter_groups(model, 0.1, gate_lr=0.03), 3e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (3e-3, (0.9, 0.95), 1e-8, 0.1),
        (3e-3, (0.9, 0.95), 1e-8, 0.0),
        (0.03, (0.9, 0.95), 1e-8, 0.0),
    ]
    scheduler = create_scheduler(optimizer, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    cosine = [3e-3 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)) for step in range(2, 10)]
    assert lrs == pytest.approx([0.0, 1.5e-3, *cosine])  # linear warmup, then the cosine down to 0 at step 10


def test_no_loop_builds_its_own_adamw_or_schedule():
    pattern = re.compile(r"torch\.optim\.AdamW\(|get_cosine_schedule_with_warmup\(")
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "optimization.py" and pattern.search(path.read_text())
    ]
    assert offenders == []
