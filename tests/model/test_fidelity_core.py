"""Issue 14 items 1, 2, 3 and 8: Sonett behaves like a model that ships inside transformers.

return_dict=False gives tuples, checkpoints load across heads through `base_model_prefix`, `shift_labels` drives
the loss, attention maps come back under every backend, the output-capturing mechanism records what the model
returns, and the flags (`_is_stateful`, parallel plans, assisted decoding) tell the truth.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers_model import VOCAB, max_diff, random_ids, tiny_model
from helpers_vision import vlm
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils.output_capturing import capture_outputs

from sonett import SonettForCausalLM, SonettModel
from sonett.model.modeling_sonett import SonettPreTrainedModel

KINDS = ["full_attention", "sliding_attention", "linear_attention", "memory_attention"]


def all_kinds_model(seed=0, attn_implementation=None, **overrides):
    return tiny_model(
        "full",
        seed=seed,
        attn_implementation=attn_implementation,
        layer_types=KINDS,
        num_hidden_layers=len(KINDS),
        linear_feature_dim=4,
        **overrides,
    )


def assert_same(a, b):
    """Equal nested outputs: tensors equal, caches the same object, tuples elementwise."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert type(a) is type(b)


# ----------------------------------------------------------------------------------------------------------
# Item 1: return_dict=False returns a plain tuple (None entries dropped, as ModelOutput.to_tuple does)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["base", "lm", "vlm"])
def test_return_dict_false_gives_the_output_as_a_tuple(head):
    model = {"base": lambda: tiny_model("mixed").model, "lm": lambda: tiny_model("mixed"), "vlm": vlm}[head]()
    ids = random_ids(2, 7)
    kwargs = {"output_hidden_states": True}
    if head != "base":
        kwargs["labels"] = ids
    with torch.no_grad():
        as_dict = model(ids, **kwargs)
        as_tuple = model(ids, return_dict=False, **kwargs)
        as_dict_again = model(ids, return_dict=True, **kwargs)
    assert type(as_tuple) is tuple
    assert len(as_tuple) == len(as_dict.to_tuple())
    assert_same(as_tuple[:1], as_dict.to_tuple()[:1])  # loss or last_hidden_state
    assert_same(as_tuple[-1], as_dict.hidden_states)
    assert not isinstance(as_dict_again, tuple)


def test_config_return_dict_false_gives_tuples_and_generate_still_works():
    model = tiny_model("mixed")
    ids = random_ids(1, 6)
    reference = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.config.return_dict = False
    assert model.config.use_return_dict is False
    with torch.no_grad():
        out = model(ids, labels=ids)
        base_out = model.model(ids)
        explicit = model(ids, return_dict=True)
    assert type(out) is tuple and out[0].dim() == 0 and out[1].shape == (1, 6, VOCAB)
    assert type(base_out) is tuple and base_out[0].shape == (1, 6, 32)
    assert not isinstance(explicit, tuple)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), reference)


# ----------------------------------------------------------------------------------------------------------
# Item 3: shift_labels is the loss target when given (transformers' ForCausalLMLoss skips its own shift)
# ----------------------------------------------------------------------------------------------------------


def shifted(labels):
    return nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]


@pytest.mark.parametrize("head", ["lm", "vlm"])
def test_shift_labels_is_the_loss_target(head):
    model = tiny_model("mixed") if head == "lm" else vlm()
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        reference = model(ids, labels=labels).loss
        alone = model(ids, shift_labels=shifted(labels)).loss
        both = model(ids, labels=labels, shift_labels=shifted(labels)).loss
        other = model(ids, shift_labels=shifted(random_ids(2, 9, seed=7))).loss
        counted = model(ids, shift_labels=shifted(labels), num_items_in_batch=torch.tensor(30)).loss
        counted_ref = model(ids, labels=labels, num_items_in_batch=torch.tensor(30)).loss
    assert torch.allclose(alone, reference, atol=1e-6)
    assert torch.allclose(both, reference, atol=1e-6)
    assert abs(float(other - reference)) > 1e-3  # a different target is not ignored
    assert torch.allclose(counted, counted_ref, atol=1e-6)


def test_shift_labels_keeps_the_span_penalty_share():
    model = tiny_model("sliding", adaptive_span=True, adaptive_span_loss_coef=0.5).train()
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[1, :4] = -100
    items = torch.tensor(40)
    with_labels = model(ids, labels=labels, num_items_in_batch=items).loss
    with_shift = model(ids, shift_labels=shifted(labels), num_items_in_batch=items).loss
    assert model.model.span_penalty() is not None
    assert torch.allclose(with_labels, with_shift, atol=1e-6)


def test_shift_labels_of_the_wrong_shape_are_refused():
    model = tiny_model("mixed")
    ids = random_ids(2, 9)
    with pytest.raises(ValueError, match="shift_labels.*shape"):
        model(ids, shift_labels=ids[:, :-1])


# ----------------------------------------------------------------------------------------------------------
# Item 2: loading across heads
# ----------------------------------------------------------------------------------------------------------


class SonettForScoring(SonettPreTrainedModel):
    """A head made up for these tests: the Sonett body and a new `score` layer."""

    def __init__(self, config):
        super().__init__(config)
        self.model = SonettModel(config)
        self.score = nn.Linear(config.hidden_size, 3, bias=False)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return self.score(self.model(input_ids, **kwargs).last_hidden_state)


def drop_weight(folder, name):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_base_checkpoint_loads_into_the_lm_and_back(tmp_path, tie):
    source = tiny_model("mixed", tie_word_embeddings=tie)
    ids = random_ids(2, 7)
    source.model.save_pretrained(tmp_path / "base")
    source.save_pretrained(tmp_path / "lm")

    lm, info = SonettForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    base = SonettModel.from_pretrained(tmp_path / "lm")
    with torch.no_grad():
        expected = source.model(ids).last_hidden_state
        assert torch.equal(lm.eval().model(ids).last_hidden_state, expected)
        assert torch.equal(base.eval()(ids).last_hidden_state, expected)
        if tie:
            assert info["missing_keys"] == set()
            assert torch.equal(lm(ids).logits, source(ids).logits)
        else:  # the base checkpoint has no head: a new one, reported as newly initialised
            assert info["missing_keys"] == {"lm_head.weight"}


def test_base_checkpoint_without_a_body_weight_is_still_refused(tmp_path):
    tiny_model("mixed").model.save_pretrained(tmp_path)
    drop_weight(tmp_path, "layers.1.mlp.up_proj.weight")
    for cls in (SonettModel, SonettForCausalLM, SonettForScoring):
        with pytest.raises(ValueError, match=r"lacks 1 weights.*\blayers\.1\.mlp\.up_proj\.weight"):
            cls.from_pretrained(tmp_path)


def test_untied_lm_checkpoint_without_its_head_is_still_refused(tmp_path):
    tiny_model("mixed", tie_word_embeddings=False).save_pretrained(tmp_path)
    drop_weight(tmp_path, "lm_head.weight")
    with pytest.raises(ValueError, match="lacks 1 weights.*lm_head.weight"):
        SonettForCausalLM.from_pretrained(tmp_path)
    loaded = SonettForCausalLM.from_pretrained(tmp_path, allow_missing_weights=True)
    assert loaded.lm_head.weight.shape == (VOCAB, 32)


def test_lm_checkpoint_loads_into_a_new_head_class(tmp_path):
    source = tiny_model("mixed")
    source.save_pretrained(tmp_path / "lm")
    head, info = SonettForScoring.from_pretrained(tmp_path / "lm", output_loading_info=True)
    assert info["missing_keys"] == {"score.weight"}
    assert info["unexpected_keys"] <= {"lm_head.weight"}
    ids = random_ids(2, 7)
    with torch.no_grad():
        assert torch.equal(head.eval().model(ids).last_hidden_state, source.model(ids).last_hidden_state)
    # A checkpoint saved by the head class itself must hold its head.
    head.save_pretrained(tmp_path / "head")
    assert json.loads((tmp_path / "head" / "config.json").read_text())["architectures"] == ["SonettForScoring"]
    drop_weight(tmp_path / "head", "score.weight")
    with pytest.raises(ValueError, match="lacks 1 weights.*score.weight"):
        SonettForScoring.from_pretrained(tmp_path / "head")


def test_keys_to_ignore_on_load_missing_are_not_refused(tmp_path):
    class SonettForScoringIgnored(SonettForScoring):
        _keys_to_ignore_on_load_missing = [r"score\.weight"]

    tiny_model("mixed").save_pretrained(tmp_path)
    SonettForScoring.from_pretrained(tmp_path).save_pretrained(tmp_path / "head")
    drop_weight(tmp_path / "head", "score.weight")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    config["architectures"] = ["SonettForScoringIgnored"]
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    SonettForScoringIgnored.from_pretrained(tmp_path / "head")


# ----------------------------------------------------------------------------------------------------------
# Item 8: attention maps under every backend, output capturing, truthful flags
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_output_attentions_under_every_backend_equal_the_eager_maps(backend):
    eager = all_kinds_model(attn_implementation="eager")
    model = all_kinds_model(attn_implementation=backend)
    ids = random_ids(2, 10)
    with torch.no_grad():
        reference = eager(ids, output_attentions=True).attentions
        out = model(ids, output_attentions=True)
        plain = model(ids).logits
    assert model.config._attn_implementation == backend  # switched for that call only
    assert max_diff(out.logits, plain) <= 1e-5
    assert len(out.attentions) == len(KINDS)
    for kind, maps, expected in zip(KINDS, out.attentions, reference):
        if kind == "linear_attention":
            assert maps is None and expected is None
            continue
        assert maps.shape == (2, 4, 10, 10)
        assert torch.equal(maps, expected)
        assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 10), atol=1e-5)
        assert float(maps.triu(1).abs().max()) == 0.0
        if kind != "full_attention":  # the local window of sliding and memory layers
            assert float(maps.tril(-model.config.sliding_window).abs().max()) == 0.0


def test_output_hidden_states_selects_by_index():
    model = all_kinds_model()
    ids = random_ids(2, 8)
    with torch.no_grad():
        every = model(ids, output_hidden_states=True).hidden_states
        chosen = model(ids, output_hidden_states=[0, -2]).hidden_states
        one = model(ids, output_hidden_states=-1).hidden_states
    assert len(every) == len(chosen) == len(one) == len(KINDS) + 1
    for i, state in enumerate(chosen):
        assert torch.equal(state, every[i]) if i in (0, len(KINDS) - 1) else state is None
    assert torch.equal(one[-1], every[-1]) and all(state is None for state in one[:-1])


class CapturedSonettModel(SonettModel):
    """SonettModel whose outputs are recorded by transformers' own hooks from `_can_record_outputs`."""

    forward = capture_outputs(SonettModel.forward)


def test_transformers_output_capturing_records_what_the_model_returns():
    source = all_kinds_model().model
    captured = CapturedSonettModel(source.config).eval()
    captured.load_state_dict(source.state_dict())
    ids = random_ids(2, 8)
    with torch.no_grad():
        own = source(ids, output_hidden_states=True, output_attentions=True)
        hooked = captured(ids, output_hidden_states=True, output_attentions=True)
    assert len(hooked.hidden_states) == len(own.hidden_states) == len(KINDS) + 1
    for a, b in zip(hooked.hidden_states, own.hidden_states):
        assert torch.equal(a, b)
    # transformers' hooks keep only the maps that exist (the softmax mixers); Sonett gives None for the others.
    assert len(hooked.attentions) == 3
    for a, b in zip(hooked.attentions, [maps for maps in own.attentions if maps is not None]):
        assert torch.equal(a, b)


def test_flags_and_parallel_plans_tell_the_truth():
    model = all_kinds_model()
    assert SonettPreTrainedModel._supports_flash_attn is False
    assert model._is_stateful is True and SonettForCausalLM._is_stateful is True
    assert tiny_model("mixed")._is_stateful is False  # full and sliding caches can be cropped
    # Tensor parallelism only on what every layer kind shares (the MLPs), the embeddings and the head.
    assert model.tp_plan == {
        "model.embed_tokens": "embedding_rowwise",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "lm_head": "colwise_gather_output",
    }
    assert model.pp_plan == {}
    modules = {name for name, _ in model.named_modules()}
    for pattern in model.tp_plan:
        assert pattern.replace(".*.", ".0.") in modules, pattern


TP_WORKER = """
import os, sys, torch
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig
from sonett import SonettForCausalLM

folder, ids = sys.argv[1], torch.load(sys.argv[2])
model = SonettForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=2, tp_plan="auto"))
model.eval()
gate = model.model.layers[1].mlp.gate_proj.weight
sharded = {
    "mlp": isinstance(gate, DTensor) and tuple(gate.to_local().shape) == (32, 32),
    "mixer": any(isinstance(p, DTensor) for layer in model.model.layers for p in layer.mixer.parameters()),
}
with torch.no_grad():
    logits = model(ids).logits
    greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
if int(os.environ["RANK"]) == 0:
    torch.save({"logits": logits, "greedy": greedy, "sharded": sharded}, sys.argv[3])
"""


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tensor_parallel_on_two_cpu_processes_equals_one(tmp_path, tie):
    model = all_kinds_model(tie_word_embeddings=tie)
    model.save_pretrained(tmp_path / "model")
    ids = random_ids(2, 9)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "worker.py").write_text(TP_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [
        str(tmp_path / "worker.py"),
        str(tmp_path / "model"),
        str(tmp_path / "ids.pt"),
        str(tmp_path / "out.pt"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["sharded"] == {"mlp": True, "mixer": False}  # MLPs in halves (64 -> 2 x 32 rows), mixers whole
    with torch.no_grad():
        assert max_diff(out["logits"], model(ids).logits) <= 1e-4
        assert torch.equal(out["greedy"], model.generate(ids[:1], max_new_tokens=6, do_sample=False))


HOURGLASS = {"shorten_factor": 2, "start_layer": 1, "end_layer": 2}


def assisted_models(layer_types, hierarchy=None):
    kwargs = {"layer_types": layer_types, "num_hidden_layers": len(layer_types), "linear_feature_dim": 4}
    kwargs["hierarchy"] = hierarchy
    return tiny_model("full", **kwargs), tiny_model("full", seed=5, **kwargs)


@pytest.mark.parametrize(
    "layer_types,hierarchy,refused",
    [
        (["sliding_attention", "linear_attention"], None, "linear_attention"),
        (["memory_attention", "full_attention"], None, "memory_attention"),
        (["full_attention", "sliding_attention", "full_attention"], HOURGLASS, "hierarchy"),
    ],
)
def test_assisted_decoding_is_refused_naming_the_layer_kind(layer_types, hierarchy, refused):
    model, assistant = assisted_models(layer_types, hierarchy)
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match=rf"Assisted decoding.*{refused}.*cannot be rolled back.*without"):
        model.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=assistant)
    with pytest.raises(ValueError, match=rf"Assisted decoding.*{refused}.*cannot be rolled back"):
        model.generate(ids, max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=2)
    plain, _ = assisted_models(["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match=rf"assistant model.*{refused}.*cannot be rolled back"):
        plain.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=model)


def test_assisted_decoding_with_full_and_sliding_layers_equals_greedy():
    model, assistant = assisted_models(["sliding_attention", "full_attention", "sliding_attention"])
    ids = random_ids(1, 6)
    repeated = torch.cat([ids, ids], dim=1)
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=assistant), greedy)
    lookup = model.generate(repeated, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, model.generate(repeated, max_new_tokens=16, do_sample=False))


def test_attention_maps_with_activation_checkpointing_are_refused_under_sdpa():
    """Activation checkpointing recomputes each layer in backward, after the per-call switch to eager attention is
    over, so that combination cannot give the maps; it is refused by name (eager attention gives them)."""
    model = tiny_model("full", attn_implementation="sdpa").train()
    model.gradient_checkpointing_enable()
    ids = random_ids(2, 8)
    with pytest.raises(ValueError, match="set_attn_implementation\\('eager'\\)"):
        model(ids, labels=ids, output_attentions=True)
    model.set_attn_implementation("eager")
    output = model(ids, labels=ids, output_attentions=True)
    output.loss.backward()
    assert all(weights is not None for weights in output.attentions)
