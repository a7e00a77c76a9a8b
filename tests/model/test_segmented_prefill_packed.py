"""A long no-grad forward over packed rows (position_ids that restart inside a row) of a constant-state model keeps
its documents apart: it must not take the segment-by-segment prefill through a cache, which would carry one
document's linear and memory state into the next (docs/design.md, invariant 1 holds for one sequence per row)."""

import torch
from helpers_model import max_diff, random_ids, tiny_model

CONSTANT_LAYERS = ["linear_attention", "sliding_attention", "memory_attention"]


def test_packed_rows_without_gradients_equal_the_documents_run_apart(monkeypatch):
    import sonett.model.modeling_sonett as modeling

    monkeypatch.setattr(modeling, "PREFILL_SEGMENT_TOKENS", 8)  # 40 tokens: more than two segments
    model = tiny_model(
        "full",
        layer_types=CONSTANT_LAYERS,
        num_hidden_layers=3,
        linear_feature_dim=4,
        linear_chunk_size=4,
        memory_chunk_size=4,
    )
    ids = random_ids(1, 40, seed=3)
    positions = torch.cat([torch.arange(21), torch.arange(19)]).unsqueeze(0)  # two documents in one row
    with torch.no_grad():
        packed = model(ids, position_ids=positions, use_cache=False).logits
        apart = torch.cat([model(ids[:, :21]).logits, model(ids[:, 21:]).logits], dim=1)
    assert max_diff(packed, apart) <= 1e-4  # before the fix: 4.1 (the second document read the first one's state)
