"""Issue 14, items 4 and 5: code that walks `config.sub_configs` on a text-only config, folders saved by earlier
versions, and RoPE scaling (`linear`, `dynamic`, `yarn`, `llama3`) exactly as transformers computes it."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_model import VOCAB, random_ids, tiny_config, tiny_model
from helpers_remote import NO_PACKAGE_PREAMBLE, fresh_process_env
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from sonett import SonettConfig, SonettForCausalLM, SonettForConditionalGeneration, SonettVisionConfig
from sonett.model.configuration_sonett import SAVED_LAYER_KIND_NAMES

FIXTURE = Path(__file__).parents[1] / "fixtures" / "sonett-main-2026-12"
TEXT_KINDS = ["sliding_attention", "full_attention", "linear_attention", "memory_attention"]
VISION = {"hidden_size": 32, "intermediate_size": 64, "image_size": 16, "patch_size": 4}


def text_only_config(**overrides):
    return tiny_config("full", layer_types=TEXT_KINDS, num_hidden_layers=len(TEXT_KINDS), **overrides)


def vision_config():
    return tiny_config("mixed", vision_config=dict(VISION), cross_attention_layers=[1], image_token_id=3)


# ---------------------------------------------------------------------------------------------------------------
# Item 4: sub-config walkers
# ---------------------------------------------------------------------------------------------------------------


# The walkers of transformers' common model tests (tests/causal_lm_tester.py `_config_supports_rope_scaling`,
# `_set_config_rope_params`, and the `output_attentions` / `output_hidden_states` loops of test_modeling_common.py):
# they assume every sub-config that `config.sub_configs` names is set.
def common_tests_support_rope_scaling(config: PreTrainedConfig) -> bool:
    return hasattr(config, "rope_parameters") or any(
        hasattr(getattr(config, key), "rope_parameters") for key in config.sub_configs
    )


def common_tests_set_rope_params(config: PreTrainedConfig, rope_params: dict) -> PreTrainedConfig:
    config.rope_parameters = getattr(config, "rope_parameters", {}) or {}
    config.rope_parameters.update(rope_params)
    for key in config.sub_configs:
        common_tests_set_rope_params(getattr(config, key), rope_params)
    return config


def common_tests_request_outputs(config: PreTrainedConfig) -> None:
    config.output_attentions = True
    config.output_hidden_states = True
    for key in config.sub_configs:
        getattr(config, key).output_attentions = True
        getattr(config, key).output_hidden_states = True


def test_sub_configs_names_only_the_sub_configs_that_are_set():
    """transformers reads `sub_configs` from the class (every declared one) and from instances (walkers)."""
    assert SonettConfig.sub_configs == {"vision_config": SonettVisionConfig}
    assert text_only_config().sub_configs == {}
    assert vision_config().sub_configs == {"vision_config": SonettVisionConfig}
    assert SonettConfig.sub_configs_defaults["vision_config"].optional


def test_common_test_walkers_run_on_a_text_only_config():
    """Failed before: `'NoneType' object has no attribute 'rope_parameters'` (and `output_attentions`)."""
    config = text_only_config(rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    config._attn_implementation = "eager"  # attention maps need eager (as the common tests set it)
    assert common_tests_support_rope_scaling(config)
    common_tests_set_rope_params(config, {"rope_type": "linear", "factor": 2.0})
    common_tests_request_outputs(config)
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0}
    model = SonettForCausalLM(config).eval()
    assert model.model.rotary_emb.rope_type["full_attention"] == "linear"
    with torch.no_grad():
        out = model(random_ids(1, 6))
    assert len(out.hidden_states) == len(TEXT_KINDS) + 1


def test_common_test_walkers_reach_the_vision_config():
    config = vision_config()
    common_tests_request_outputs(config)
    assert config.vision_config.output_attentions and config.vision_config.output_hidden_states
    assert common_tests_support_rope_scaling(config)


def test_transformers_config_walkers_on_a_text_only_config(tmp_path):
    """The walkers inside transformers: RoPE standardisation and validation, text config lookup, serialisation,
    `from_dict` through the generic class, generation defaults, the attention-implementation setter."""
    config = text_only_config()
    rope = json.loads(json.dumps(config.rope_parameters))
    config.standardize_rope_params()
    config.validate_rope()
    assert config.rope_parameters == rope
    assert config.get_text_config() is config
    assert config.get_text_config(decoder=True) is config
    assert config.to_dict()["vision_config"] is None
    # config.json spells memory_attention as transformers' `hybrid_sliding` (see SAVED_LAYER_KIND_NAMES).
    saved_kinds = [SAVED_LAYER_KIND_NAMES.get(kind, kind) for kind in TEXT_KINDS]
    assert json.loads(config.to_json_string())["layer_types"] == saved_kinds
    assert repr(config).startswith("SonettConfig {")
    assert "vision_config" not in config.to_diff_dict() or config.to_diff_dict()["vision_config"] is None
    # The generic class knows transformers' layer kinds only (so no memory_attention).
    softmax_only = tiny_config("mixed").to_dict()
    assert PreTrainedConfig.from_dict(softmax_only).layer_types == softmax_only["layer_types"]
    again = SonettConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert config._get_generation_parameters() == {}
    generation = GenerationConfig.from_model_config(config)
    assert generation.pad_token_id == config.pad_token_id
    config._attn_implementation = {"": "eager", "vision_config": "sdpa"}
    assert config._attn_implementation == "eager"
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert {k: v for k, v in loaded.items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"
    }


def test_transformers_model_walkers_on_a_text_only_model(tmp_path):
    """Attention-implementation dispatch and the dtype walk of `from_pretrained` on a text-only model."""
    torch.manual_seed(0)
    model = SonettForCausalLM(text_only_config()).eval()
    ids = random_ids(1, 7)
    with torch.no_grad():
        expected = model(ids).logits
    assert model._check_and_adjust_attn_implementation("eager") == "eager"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation({"": "sdpa"})
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    loaded = SonettForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager").eval()
    assert loaded.dtype == torch.float64 and loaded.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits.float(), expected, atol=1e-5)


def test_transformers_model_walkers_on_an_image_text_model():
    model = SonettForConditionalGeneration(vision_config()).eval()
    assert model._check_and_adjust_attn_implementation("eager") == "eager"
    model.set_attn_implementation({"": "eager", "vision_config": "sdpa"})
    assert model.config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------------
# Item 4: a folder saved by main before this change still loads
# ---------------------------------------------------------------------------------------------------------------


def test_folder_saved_by_main_loads_with_identical_outputs(tmp_path):
    expected = load_file(FIXTURE / "expected_outputs.safetensors")
    model = AutoModelForCausalLM.from_pretrained(FIXTURE).eval()
    assert type(model) is SonettForCausalLM
    with torch.no_grad():
        # fp32 rounding may differ from the saved run (faster kernels, issue 17); the greedy tokens may not.
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-5)
        generated = model.generate(expected["input_ids"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected["generated"])
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE)
    assert len(tokenizer) == model.config.vocab_size
    # Saved again, the config is the one main wrote, except the version stamp, the task heads added to `auto_map`
    # and memory_attention spelled `hybrid_sliding` (the only conversion an old folder needs, made on load).
    model.save_pretrained(tmp_path)
    old, new = (json.loads((folder / "config.json").read_text()) for folder in (FIXTURE, tmp_path))
    old.pop("transformers_version"), new.pop("transformers_version")
    assert new.pop("auto_map") == {**old.pop("auto_map"), **new_heads()}
    assert new.pop("layer_types") == [SAVED_LAYER_KIND_NAMES.get(kind, kind) for kind in old.pop("layer_types")]
    assert new == old
    assert SonettConfig.from_pretrained(tmp_path).layer_types == model.config.layer_types


def new_heads() -> dict:
    """The task heads that every folder's auto_map names since issue 14."""
    return {
        f"AutoModelFor{task}": f"modeling_sonett.SonettFor{task}"
        for task in ("SequenceClassification", "TokenClassification", "QuestionAnswering")
    }


def test_folder_saved_by_main_loads_as_remote_code_in_a_fresh_process(tmp_path):
    """The old config.json and weights with the current remote code, loaded where `sonett` cannot be imported."""
    folder = tmp_path / "folder"
    SonettForCausalLM.from_pretrained(FIXTURE).save_pretrained(folder)  # writes the current .py files
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(FIXTURE / name, folder / name)
    script = NO_PACKAGE_PREAMBLE + textwrap.dedent(
        """
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        folder, fixture = sys.argv[1], sys.argv[2]
        expected = load_file(fixture + "/expected_outputs.safetensors")
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config.sub_configs == {}, model.config.sub_configs
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)  # fp32 rounding (issue 17)
        print("identical")
        """
    )
    (tmp_path / "load.py").write_text(script)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(folder), str(FIXTURE)],
        cwd=tmp_path,
        env=fresh_process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "identical" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Item 5: RoPE scaling through the config
# ---------------------------------------------------------------------------------------------------------------

MAX_POSITIONS = 16
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 8.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "low_freq_factor": 1.0,
        "high_freq_factor": 2.0,
    },
}
# The longest input each scaling lets the full_attention layers take (max_position_embeddings 16).
SCALED_LIMITS = {"linear": 32, "dynamic": 32, "yarn": 32, "llama3": 32}
rope_types = pytest.mark.parametrize("rope_type", sorted(SCALINGS))


def scaled_params(rope_type, theta=10_000.0):
    return {**SCALINGS[rope_type], "rope_theta": theta}


def llama_config(rope_type, **overrides):
    kwargs = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_parameters": scaled_params(rope_type),
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": None,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def sonett_rope(rope_parameters, kinds=("full_attention", "sliding_attention")):
    """The rotary module of a model with the given kinds and RoPE settings."""
    config = tiny_config(
        "full",
        layer_types=list(kinds),
        num_hidden_layers=len(kinds),
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=rope_parameters,
    )
    return SonettForCausalLM(config).model.rotary_emb


@rope_types
@pytest.mark.parametrize("layout", ["flat", "per-kind"])
def test_scaled_frequencies_equal_transformers_initialisers(rope_type, layout):
    params = scaled_params(rope_type)
    if layout == "flat":
        rope = sonett_rope(params)
        scaled_kinds = ["full_attention", "sliding_attention"]
    else:
        rope = sonett_rope({"full_attention": params, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
        scaled_kinds = ["full_attention"]
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](llama_config(rope_type), None)
    default_inv_freq = 1.0 / (1e4 ** (torch.arange(0, 8, 2, dtype=torch.float) / 8))
    for kind in ("full_attention", "sliding_attention"):
        expected = inv_freq if kind in scaled_kinds else default_inv_freq
        assert torch.equal(getattr(rope, f"{kind}_inv_freq"), expected), kind
        assert rope.attention_scaling[kind] == (scaling if kind in scaled_kinds else 1.0)


@rope_types
def test_cos_sin_equal_llamas_rotary_embedding_also_past_max_positions(rope_type):
    """Llama's rotary module (transformers' initialisers and `dynamic_rope_update`) is the oracle, called in the
    order generation calls it: a short prompt, a long one, decode steps past it, a short one again."""
    rope = sonett_rope(scaled_params(rope_type))
    oracle = LlamaRotaryEmbedding(llama_config(rope_type))
    x = torch.zeros(1, 1, 8)
    calls = [torch.arange(10)[None], torch.arange(28)[None], torch.tensor([[28]]), torch.tensor([[29]])]
    calls += [torch.arange(12)[None], torch.arange(20)[None], torch.tensor([[20]])]
    for positions in calls:
        cos, sin = rope(x, positions, "full_attention")
        expected_cos, expected_sin = oracle(x, positions)
        assert torch.equal(cos, expected_cos), (rope_type, positions.max())
        assert torch.equal(sin, expected_sin), (rope_type, positions.max())


def test_dynamic_scaling_changes_nothing_up_to_max_positions_and_rescales_past_it():
    plain = sonett_rope({"rope_type": "default", "rope_theta": 1e4})
    dynamic = sonett_rope(scaled_params("dynamic"))
    x = torch.zeros(1, 1, 8)
    short, long = torch.arange(MAX_POSITIONS)[None], torch.arange(2 * MAX_POSITIONS)[None]
    assert torch.equal(dynamic(x, short, "full_attention")[0], plain(x, short, "full_attention")[0])
    assert not torch.allclose(dynamic(x, long, "full_attention")[0], plain(x, long, "full_attention")[0])
    # The long call leaves no state behind: a short call afterwards is unscaled again.
    assert torch.equal(dynamic(x, short, "full_attention")[0], plain(x, short, "full_attention")[0])


def test_scaling_leaves_linear_attention_layers_untouched():
    """Only RoPE kinds read `rope_parameters`: the linear_attention layer's output is the same bit for bit."""
    kinds = ["linear_attention", "full_attention"]
    ids = random_ids(1, 12)
    outputs = {}
    for name, rope in (("plain", None), ("scaled", scaled_params("yarn"))):
        model = tiny_model("full", seed=5, layer_types=kinds, num_hidden_layers=2, rope_parameters=rope)
        assert set(model.model.rotary_emb.kinds) == {"full_attention"}
        with torch.no_grad():
            outputs[name] = model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(outputs["plain"][1], outputs["scaled"][1])  # after the linear_attention layer
    assert not torch.allclose(outputs["plain"][2], outputs["scaled"][2])  # after the full_attention layer


def llama_twin(model: SonettForCausalLM, rope_type: str) -> LlamaForCausalLM:
    """A Llama with the Sonett model's weights (mixer -> self_attn) and the same RoPE settings."""
    llama = LlamaForCausalLM(llama_config(rope_type, attn_implementation="eager")).eval()
    state = {name.replace(".mixer.", ".self_attn."): tensor for name, tensor in model.state_dict().items()}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    llama.tie_weights()
    return llama


@rope_types
def test_logits_equal_a_llama_with_the_same_weights_and_rope_parameters(rope_type):
    """The end-to-end property: full_attention-only Sonett == Llama, past max_position_embeddings too (dynamic
    rescales there), in one forward and in greedy generation across the boundary."""
    model = tiny_model(
        "full",
        seed=9,
        attn_implementation="eager",
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=scaled_params(rope_type),
    )
    llama = llama_twin(model, rope_type)
    ids = random_ids(2, 2 * MAX_POSITIONS - 4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=2e-5)
        prompt = ids[:, : MAX_POSITIONS - 3]
        kwargs = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
        ours = model.generate(prompt, pad_token_id=0, **kwargs)
        theirs = llama.generate(prompt, pad_token_id=0, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=f"step {step}")


# ---------------------------------------------------------------------------------------------------------------
# Item 5: the position limit of scaled RoPE, and invalid settings
# ---------------------------------------------------------------------------------------------------------------


@rope_types
def test_scaled_rope_extends_the_position_limit(rope_type):
    model = tiny_model("mixed", max_position_embeddings=MAX_POSITIONS, rope_parameters=scaled_params(rope_type))
    limit = SCALED_LIMITS[rope_type]
    with torch.no_grad():
        assert model(random_ids(1, limit)).logits.shape == (1, limit, VOCAB)
        message = rf"reaches position {limit} .*at most {limit} positions .*rope_type '{rope_type}'.*factor"
        with pytest.raises(ValueError, match=message):
            model(random_ids(1, limit + 1))
        with pytest.raises(ValueError, match=rf"grow the sequences to {limit + 1} tokens.*at most {limit} positions"):
            model.generate(random_ids(1, limit - 2), max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_yarn_limit_is_max_positions_when_that_already_holds_the_extended_length():
    """With max_position_embeddings = factor x original_max_position_embeddings (the usual yarn config)."""
    params = {**scaled_params("yarn"), "factor": 2.0}  # 2 x 8 = 16 = max_position_embeddings
    config = tiny_config("mixed", max_position_embeddings=MAX_POSITIONS, rope_parameters=params)
    assert config.rope_max_positions("full_attention") == MAX_POSITIONS
    config = tiny_config(
        "mixed", max_position_embeddings=64, rope_parameters={**params, "original_max_position_embeddings": 16}
    )
    assert config.rope_max_positions("full_attention") == 64


def test_scaling_only_the_sliding_kind_keeps_the_full_attention_limit():
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": scaled_params("linear")}
    model = tiny_model("mixed", max_position_embeddings=MAX_POSITIONS, rope_parameters=rope)
    with torch.no_grad(), pytest.raises(ValueError, match=r"at most 16 positions \(max_position_embeddings=16\)"):
        model(random_ids(1, MAX_POSITIONS + 1))


def test_flat_dict_without_a_base_keeps_each_kinds_default_base():
    config = tiny_config("mixed", rope_parameters={"rope_type": "linear", "factor": 2.0})
    assert config.rope_parameters_for("full_attention") == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert config.rope_parameters_for("sliding_attention") == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}


def test_per_kind_dict_fills_the_kinds_it_leaves_out():
    config = tiny_config("mixed", rope_parameters={"full_attention": scaled_params("linear")})
    assert config.rope_parameters_for("sliding_attention") == {"rope_type": "default", "rope_theta": 1e4}
    assert SonettForCausalLM(config).model.rotary_emb.rope_type == {
        "full_attention": "linear",
        "sliding_attention": "default",
    }


def test_legacy_rope_scaling_and_rope_theta_keys_are_read():
    config = tiny_config("mixed", rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5e5)
    assert config.rope_parameters_for("full_attention")["rope_type"] == "linear"
    assert config.rope_parameters_for("sliding_attention")["rope_theta"] == 5e5


@pytest.mark.parametrize(
    ("rope_parameters", "message"),
    [
        ({"rope_type": "linear"}, r"\['full_attention'\]: Missing required keys .*'factor'"),
        ({"rope_type": "linear", "rope_theta": 1e4}, r": Missing required keys .*'factor'"),
        ({"rope_type": "dynamic", "factor": 0.5}, r".*factor must be a number >= 1, got 0.5"),
        ({"rope_type": "yarn", "factor": "4"}, r".*factor must be a number >= 1, got '4'"),
        ({"rope_type": "default", "rope_theta": -1.0}, r".*rope_theta must be a positive number, got -1.0"),
        ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, r".*partial_rotary_factor"),
        (
            {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 8},
            r": Missing required keys .*low_freq_factor",
        ),
        (
            {
                "rope_type": "llama3",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 8,
                "low_freq_factor": 2.0,
                "high_freq_factor": 1.0,
            },
            r".*high_freq_factor \(1.0\) must be greater than low_freq_factor \(2.0\)",
        ),
        (
            {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0},
            r".*original_max_position_embeddings must be a positive integer, got 0",
        ),
        ({"rope_type": "longrope", "rope_theta": 1e4}, r".*rope_type 'longrope' .* is not supported; use one of"),
        (
            {"full_attention": {"rope_type": "default", "rope_theta": 1e4}, "rope_type": "linear", "factor": 2.0},
            r" mixes per-kind entries \['full_attention'\] with flat keys \['factor', 'rope_type'\]",
        ),
        ({"linear_attention": {"rope_type": "default"}}, r".*linear_attention layers use no RoPE"),
        ({"full_attention": "yarn"}, r"\['full_attention'\] must be a dict"),
        ("yarn", r" must be a dict"),
    ],
    ids=[
        "missing-factor-spread",
        "missing-factor",
        "factor-below-one",
        "factor-not-a-number",
        "negative-theta",
        "partial-rotary",
        "llama3-missing-keys",
        "llama3-freq-order",
        "yarn-original-zero",
        "unsupported-type",
        "hybrid",
        "linear-kind",
        "entry-not-dict",
        "not-dict",
    ],
)
def test_invalid_rope_parameters_name_the_field(rope_parameters, message):
    with pytest.raises(ValueError, match=r"SonettConfig\.rope_parameters.*" + message):
        tiny_config("mixed", rope_parameters=rope_parameters)


def test_rope_parameters_edited_after_init_are_checked_when_the_model_is_built():
    config = tiny_config("mixed")
    config.rope_parameters.update({"rope_type": "linear", "factor": 2.0})  # as transformers' common tests do
    with pytest.raises(ValueError, match=r"mixes per-kind entries .* with flat keys"):
        SonettForCausalLM(config)
