"""A long no-grad forward rotates queries and keys chunk by chunk (issue 17, prefill memory) without writing into
the projections' outputs: a forward hook that kept `q_proj`'s or `k_proj`'s output (activation capture, KV
inspection) must still hold the unrotated projection after the forward, as it does for a short input."""

import torch
from helpers_model import random_ids, tiny_model

import sonett.model.attention_sonett as attention


def test_hooked_projection_outputs_are_not_rotated_in_place(monkeypatch):
    monkeypatch.setattr(attention, "PREFILL_CHUNK_TOKENS", 8)  # 30 tokens: four chunks
    model = tiny_model("full")
    kept = {}

    def keep(name):
        def hook(module, args, output):
            kept[name] = (output, output.clone())

        return hook

    mixer = model.model.layers[0].mixer
    mixer.q_proj.register_forward_hook(keep("q"))
    mixer.k_proj.register_forward_hook(keep("k"))
    with torch.no_grad():
        long_logits = model(random_ids(1, 30, seed=3)).logits
    for name, (output, at_hook_time) in kept.items():
        assert torch.equal(output, at_hook_time), name
    monkeypatch.setattr(attention, "PREFILL_CHUNK_TOKENS", 2048)
    with torch.no_grad():
        torch.testing.assert_close(model(random_ids(1, 30, seed=3)).logits, long_logits, atol=1e-6, rtol=1e-6)
