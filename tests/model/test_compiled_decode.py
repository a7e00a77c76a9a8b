"""The compiled decode step (issue 17): `torch.compile` with the default inductor backend, which generates fused CPU
code, gives the eager step's greedy tokens for every layer kind at once, with left padding, through `generate`
(`cache_implementation="static"` and a `compile_config`) and through a hand-written loop of `model.forward`.

One end-to-end test for the feature: inductor compiles each graph once (about half a minute on 2 cores); the graph
break and recompilation checks with a counting backend are in test_fidelity_compile.py."""

import torch
from helpers_model import PAD, left_pad, random_ids, tiny_model
from transformers import CompileConfig

EVERY_KIND = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
NEW_TOKENS = 8


def test_inductor_compiled_decode_gives_the_eager_tokens():
    torch._dynamo.reset()
    model = tiny_model("mixed", layer_types=EVERY_KIND, num_hidden_layers=len(EVERY_KIND))
    input_ids, attention_mask = left_pad([random_ids(1, 9, seed=41)[0], random_ids(1, 5, seed=42)[0]])
    kwargs = {
        "attention_mask": attention_mask,
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "pad_token_id": PAD,
        "return_dict_in_generate": True,
        "output_scores": True,
    }
    with torch.no_grad():
        eager = model.generate(input_ids, **kwargs)
        config = CompileConfig(fullgraph=True)  # default backend: inductor
        config._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
        model.generation_config.compile_config = config
        compiled = model.generate(input_ids, cache_implementation="static", **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    for got, want in zip(compiled.scores, eager.scores):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # the same step compiled by hand over a static cache (what `sonett benchmark` times)
    step = torch.compile(model.forward, fullgraph=True)
    with torch.no_grad():
        cache = model.make_cache("static", max_cache_len=input_ids.shape[1] + NEW_TOKENS + 1)
        out = model(input_ids, attention_mask=attention_mask, cache=cache)
        tokens, mask = [out.logits[:, -1:].argmax(-1)], attention_mask
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            tokens.append(step(input_ids=tokens[-1], attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1))
    assert torch.equal(torch.cat(tokens, dim=1), eager.sequences[:, input_ids.shape[1] :])
