"""Static shapes and compilation: `cache_implementation="static"`, a fullgraph decode step, `_can_compile_fullgraph`.

A static cache must give the same greedy tokens as the dynamic one for every layer kind (left padding included), and
one decode step must compile with `torch.compile(fullgraph=True)`: no graph breaks, logits equal to the eager step,
and no recompilation once the 2-D mask's growing length has been seen once (that costs one recompile).
"""

import pytest
import torch
from helpers_model import PAD, VOCAB, left_pad, random_ids, tiny_config, tiny_model
from helpers_vision import multimodal, pixels
from helpers_vision import prompt as image_prompt
from transformers import CompileConfig

from sonett import SonettCache, SonettForCausalLM, SonettStaticCache

KINDS = {
    "full": ["full_attention", "full_attention"],
    "sliding": ["sliding_attention", "sliding_attention"],
    "linear": ["linear_attention", "linear_attention"],
    "memory": ["memory_attention", "memory_attention"],
    "all": ["full_attention", "sliding_attention", "linear_attention", "memory_attention"],
}
HIERARCHY = {"shorten_factor": 2, "start_layer": 1, "end_layer": 2}
NEW_TOKENS = 8  # prompt 7 + 8 new tokens run well past the window of 4


def kind_model(kind: str, **overrides) -> SonettForCausalLM:
    layer_types = KINDS[kind]
    return tiny_model("mixed", layer_types=layer_types, num_hidden_layers=len(layer_types), **overrides)


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([random_ids(1, 7, seed=51)[0], random_ids(1, 3, seed=52)[0]])


def greedy(model, **kwargs):
    input_ids, attention_mask = padded_prompts()
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


@pytest.mark.parametrize("kind", list(KINDS))
def test_static_cache_generates_the_dynamic_tokens(kind):
    model = kind_model(kind)
    dynamic = greedy(model)
    static = greedy(model, cache_implementation="static")
    assert type(dynamic.cache) is SonettCache
    assert isinstance(static.cache, SonettStaticCache) and static.cache.is_compileable
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_static_cache_is_selected_by_the_generation_config():
    model = kind_model("all")
    model.generation_config.cache_implementation = "static"
    out = greedy(model)
    assert isinstance(out.cache, SonettStaticCache)
    # max_length - 1 tokens go through the model; one spare slot keeps the last step from recompiling
    assert out.cache.max_cache_len == out.sequences.shape[1]


@pytest.mark.parametrize("strategy", [{"num_beams": 3}, {"prefill_chunk_size": 3}], ids=["beam-3", "chunked-prefill"])
def test_static_cache_in_beam_search_and_chunked_prefill(strategy):
    model = kind_model("all")
    assert torch.equal(
        greedy(model, cache_implementation="static", **strategy).sequences, greedy(model, **strategy).sequences
    )


def test_static_buffers_keep_their_shapes_and_addresses():
    model = kind_model("all")
    cache = model.make_cache("static", max_cache_len=20)
    input_ids, attention_mask = padded_prompts()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, cache=cache)
        before = {name: (t.shape, t.data_ptr()) for name, t in cache.state_tensors().items()}
        ids = torch.tensor([[5], [6]])
        for _ in range(6):
            attention_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=attention_mask.dtype)], dim=1)
            model(input_ids=ids, attention_mask=attention_mask, cache=cache)
    after = {name: (t.shape, t.data_ptr()) for name, t in cache.state_tensors().items()}
    assert after == before
    assert int(cache.get_seq_length()) == input_ids.shape[1] + 6


@pytest.mark.parametrize("implementation", ["offloaded", "quantized", "sliding_window"])
def test_unsupported_cache_implementation_names_the_supported_ones(implementation):
    model = kind_model("all")
    with pytest.raises(ValueError, match="'dynamic', 'static'"):
        greedy(model, cache_implementation=implementation)
    with pytest.raises(ValueError, match="'dynamic', 'static'"):
        model.make_cache(implementation)


def test_static_cache_refuses_what_it_cannot_hold(tmp_path):
    hourglass = tiny_config("mixed", hierarchy=HIERARCHY)
    with pytest.raises(ValueError, match="hierarchy"):
        SonettStaticCache(hourglass, max_cache_len=16)
    with pytest.raises(ValueError, match="max_cache_len"):
        kind_model("all").make_cache("static")
    model = kind_model("all")
    cache = model.make_cache("static", max_cache_len=8)
    with pytest.raises(ValueError, match="at most 8 tokens"):
        model(input_ids=random_ids(1, 9), cache=cache)
    with pytest.raises(ValueError, match="not saved"):
        cache.save(tmp_path / "memory.safetensors")
    # Without full_attention layers every state is fixed-size, so no length is needed.
    assert kind_model("linear").make_cache("static").is_compileable


def test_bad_prompt_errors_still_fire_with_a_static_cache():
    model = kind_model("all")
    bad = torch.tensor([[3, VOCAB + 5, 4]])
    with pytest.raises(ValueError, match=f"Token id {VOCAB + 5} is out of range"):
        model.generate(bad, max_new_tokens=2, cache_implementation="static", pad_token_id=PAD)
    cache = model.make_cache("static", max_cache_len=16)
    with torch.no_grad():
        model(input_ids=random_ids(1, 4), cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=random_ids(1, 1), attention_mask=torch.ones(1, 3, dtype=torch.long), cache=cache)


def decode_inputs(model, cache, steps: int):
    """Prefill a left-padded batch into `cache`; yield each decode step's inputs (the argmax of the last logits)."""
    input_ids, attention_mask = padded_prompts()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache).logits
    for _ in range(steps):
        attention_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=attention_mask.dtype)], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1)[:, -1:]
        logits = yield {
            "input_ids": logits[:, -1:].argmax(-1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }


@pytest.mark.parametrize("implementation", ["static", "dynamic"])
def test_decode_step_has_no_graph_breaks(implementation):
    model = kind_model("all")
    cache = model.make_cache(implementation, max_cache_len=24)
    inputs = next(decode_inputs(model, cache, steps=1))
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs, cache=cache)
    reasons = [reason.reason.splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons


def test_compiled_decode_step_matches_eager_without_recompiling():
    torch._dynamo.reset()
    model = kind_model("all")
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model.forward, fullgraph=True, backend=counting_backend)
    compiled_cache = model.make_cache("static", max_cache_len=24)
    eager_cache = model.make_cache("static", max_cache_len=24)
    steps = decode_inputs(model, compiled_cache, steps=6)
    next(decode_inputs(model, eager_cache, steps=1))  # the same prefill into the eager model's cache
    inputs = next(steps)
    with torch.no_grad():
        for step in range(6):
            # The mask grows by one column per step: one recompile makes its length symbolic, then none.
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                got = compiled(**inputs, cache=compiled_cache).logits
            want = model(**inputs, cache=eager_cache).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if step < 5:
                inputs = steps.send(want)
    assert len(graphs) <= 2


def test_generate_auto_compiles_the_decode_step_once_with_a_static_cache():
    torch._dynamo.reset()
    model = kind_model("all")
    want = greedy(model).sequences
    graphs = []

    def counting_backend(graph_module, example_inputs):  # the "eager" backend, counted
        graphs.append(graph_module)
        return graph_module.forward

    config = CompileConfig(fullgraph=True, backend=counting_backend, mode=None)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
    model.generation_config.compile_config = config
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = greedy(model, cache_implementation="static")
    assert len(graphs) == 1, "generate did not compile the decode step, or compiled it more than once"
    assert torch.equal(got.sequences, want)


def test_static_cache_with_images_generates_the_dynamic_tokens_and_compiles():
    _, model = multimodal()
    ids, images = image_prompt(), pixels()
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD}
    with torch.no_grad():
        dynamic = model.generate(ids, pixel_values=images, **kwargs)
        static = model.generate(ids, pixel_values=images, cache_implementation="static", **kwargs)
        assert torch.equal(static, dynamic)
        cache = model.make_cache("static", max_cache_len=16)
        next_ids = model(ids, pixel_values=images, cache=cache).logits[:, -1:].argmax(-1)
        mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
        explanation = torch._dynamo.explain(model)(input_ids=next_ids, attention_mask=mask, cache=cache)
    assert explanation.graph_break_count == 0
    assert model._can_compile_fullgraph


def test_can_compile_fullgraph_tells_the_truth():
    assert SonettForCausalLM._can_compile_fullgraph
    assert kind_model("all")._can_compile_fullgraph
    assert not SonettForCausalLM(tiny_config("mixed", hierarchy=HIERARCHY))._can_compile_fullgraph
