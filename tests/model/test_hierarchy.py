"""Hourglass hierarchy: docs/design.md, invariants 1 (incremental decoding), 3 (causality) and 4 (padding) with a
shortened span of layers, for k = 2 and 3 at lengths on and off multiples of k; generation; the cache file;
gradients; and the errors for configs and inputs a hierarchy cannot take."""

import pytest
import torch
from helpers_hierarchy import HOURGLASS_MODEL_KINDS, hourglass_model
from helpers_model import PAD, VOCAB, left_pad, max_diff, random_ids, tiny_config, tiny_model

from sonett import SonettCache, SonettConfig, SonettForCausalLM
from sonett.model.hierarchy_sonett import SonettHourglass

FACTORS = [2, 3]
factors = pytest.mark.parametrize("k", FACTORS)


def lengths(k):
    """Lengths on a multiple of k and every offset from it."""
    return [4 * k + offset for offset in range(k)]


def decode_token_by_token(model, ids, prefill, attention_mask=None):
    """Logits of a prefill of `prefill` tokens followed by one token per step, through the cache."""
    with torch.no_grad():
        mask = None if attention_mask is None else attention_mask[:, :prefill]
        out = model(ids[:, :prefill], attention_mask=mask, use_cache=True)
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            mask = None if attention_mask is None else attention_mask[:, : t + 1]
            out = model(ids[:, t : t + 1], attention_mask=mask, cache=out.cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


@factors
@pytest.mark.parametrize(("pooling", "upsampling"), [("linear", "repeat"), ("mean", "linear")])
def test_incremental_decoding_equals_the_full_forward(k, pooling, upsampling):
    model = hourglass_model(k, pooling=pooling, upsampling=upsampling)
    for length in lengths(k):
        ids = random_ids(2, length, seed=length)
        with torch.no_grad():
            full = model(ids).logits
        for prefill in (1, k, k + 1):
            assert max_diff(decode_token_by_token(model, ids, prefill), full) <= 1e-4, (length, prefill)


@factors
def test_prefill_in_uneven_chunks_equals_the_full_forward(k):
    model = hourglass_model(k)
    ids = random_ids(2, 6 * k + 1, seed=5)
    with torch.no_grad():
        full = model(ids).logits
        cache, chunks, start = None, [], 0
        for size in (k + 1, 1, 2 * k - 1, 3, ids.shape[1]):
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            cache, start = out.cache, start + size
            chunks.append(out.logits)
            if start >= ids.shape[1]:
                break
    assert max_diff(torch.cat(chunks, dim=1), full) <= 1e-4


def test_a_new_hourglass_starts_as_its_full_length_layers_alone():
    """Upsampling starts at zero: a new model gives the logits of a flat model made of its layers outside the span."""
    hierarchy = {"shorten_factor": 2, "start_layer": 1, "end_layer": 5}
    torch.manual_seed(0)
    model = SonettForCausalLM(
        tiny_config(
            "full",
            layer_types=HOURGLASS_MODEL_KINDS,
            num_hidden_layers=len(HOURGLASS_MODEL_KINDS),
            linear_feature_dim=4,
            hierarchy=hierarchy,
        )
    ).eval()
    assert torch.count_nonzero(model.model.hourglass.upsample_proj.weight) == 0
    outside = [0, 5, 6]
    flat = SonettForCausalLM(
        tiny_config(
            "full", layer_types=[HOURGLASS_MODEL_KINDS[i] for i in outside], num_hidden_layers=3, linear_feature_dim=4
        )
    ).eval()
    renamed = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(outside)}
    state = {}
    for name, tensor in model.state_dict().items():
        for old, new in renamed.items():
            name = name.replace(old, new) if name.startswith(old) else name
        state[name] = tensor
    flat.load_state_dict({name: state[name] for name in flat.state_dict()})
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert max_diff(model(ids).logits, flat(ids).logits) <= 1e-6


def test_loading_keeps_the_trained_upsampling(tmp_path):
    trained = hourglass_model(2)
    trained.save_pretrained(tmp_path)
    loaded = SonettForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.hourglass.upsample_proj.weight, trained.model.hourglass.upsample_proj.weight)


@factors
def test_the_shortened_span_changes_the_output(k):
    """The hourglass is not a no-op: dropping the upsampled path changes the logits."""
    model = hourglass_model(k)
    ids = random_ids(1, 4 * k)
    with torch.no_grad():
        before = model(ids).logits
        model.model.hourglass.upsample_proj.weight.zero_()
        after = model(ids).logits
    assert max_diff(before, after) > 1e-2


def perturbed_outputs_at_or_before(model, ids, t):
    """Largest change of the logits at positions <= t when token t + 1 is replaced."""
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        return max_diff(model(ids).logits[:, : t + 1], model(changed).logits[:, : t + 1])


@factors
@pytest.mark.parametrize("upsampling", ["repeat", "linear"])
def test_changing_token_t_plus_1_never_changes_outputs_up_to_t(k, upsampling):
    model = hourglass_model(k, upsampling=upsampling)
    for length in lengths(k):
        ids = random_ids(1, length, seed=length)
        for t in range(length - 1):
            assert perturbed_outputs_at_or_before(model, ids, t) == 0.0, (length, t)


class LeakyHourglass(SonettHourglass):
    """The classic hourglass bug: pooling groups without the shift by k - 1."""

    def grouping(self, positions):
        k = self.shorten_factor
        return positions // k + 1, positions % k, positions // k + 1


def test_the_causality_check_catches_an_hourglass_without_the_shift():
    model = hourglass_model(2)
    leaky = LeakyHourglass(model.config)
    leaky.load_state_dict(model.model.hourglass.state_dict())
    model.model.hourglass = leaky
    ids = random_ids(1, 8)
    assert perturbed_outputs_at_or_before(model, ids, 2) > 1e-3


@factors
def test_left_padded_batch_gives_each_row_its_own_logits(k):
    """Rows padded by 0 .. k different amounts (every phase of the groups), in one forward and while decoding."""
    model = hourglass_model(k, upsampling="linear")
    rows = [random_ids(1, 3 * k + extra, seed=extra)[0] for extra in range(k + 1)]
    input_ids, attention_mask = left_pad(rows)
    nxt = random_ids(len(rows), 2 * k + 1, seed=40)
    ids = torch.cat([input_ids, nxt], dim=1)
    mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        decoded = decode_token_by_token(model, ids, input_ids.shape[1], attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, nxt[i]])[None]).logits[0]
            real = len(row) + nxt.shape[1]
            assert max_diff(full[i, -real:], alone) <= 1e-5, i
            assert max_diff(decoded[i, -real:], alone) <= 1e-4, i


def test_right_padded_rows_keep_their_logits():
    model = hourglass_model(3)
    rows = [random_ids(1, n, seed=n)[0] for n in (7, 11)]
    ids = torch.full((2, 11), PAD)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            assert max_diff(batch[i, : len(row)], model(row[None]).logits[0]) <= 1e-5


def test_a_row_whose_first_chunk_is_all_padding_joins_later():
    """Chunked prefill where one row's real tokens only start in the second chunk."""
    model = hourglass_model(2)
    rows = [random_ids(1, 9, seed=1)[0], random_ids(1, 3, seed=2)[0]]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        first = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        second = model(ids[:, 5:], attention_mask=mask, cache=first.cache, use_cache=True)
        short_alone = model(rows[1][None]).logits[0]
    assert max_diff(second.logits[1, -3:], short_alone) <= 1e-5


@factors
def test_greedy_generate_follows_the_full_forward_argmax(k):
    model = hourglass_model(k)
    ids = random_ids(1, 2 * k + 1)
    generated = model.generate(ids, max_new_tokens=3 * k + 1, do_sample=False, pad_token_id=PAD)
    expected = ids
    with torch.no_grad():
        for _ in range(3 * k + 1):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize(
    "strategy",
    [
        {"do_sample": False},
        {"do_sample": True, "top_k": 8, "num_return_sequences": 2},
        {"num_beams": 3, "num_return_sequences": 2, "do_sample": False},
    ],
    ids=["greedy", "sample", "beam"],
)
def test_generate_with_and_without_cache_agree_on_a_padded_batch(strategy):
    model = hourglass_model(3)
    input_ids, attention_mask = left_pad([random_ids(1, n, seed=n)[0] for n in (5, 7, 8)])
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs.append(
            model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=7,
                pad_token_id=PAD,
                use_cache=use_cache,
                **strategy,
            )
        )
    assert torch.equal(outputs[0], outputs[1])


def test_beam_search_on_a_padded_batch_equals_each_row_alone():
    model = hourglass_model(2)
    rows = [random_ids(1, n, seed=n)[0] for n in (6, 9)]
    input_ids, attention_mask = left_pad(rows)
    settings = {"num_beams": 3, "do_sample": False, "max_new_tokens": 6, "pad_token_id": PAD}
    batch = model.generate(input_ids, attention_mask=attention_mask, **settings)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], **settings)
        assert torch.equal(batch[i, -6:], alone[0, -6:]), i


def test_cache_file_continues_the_sequence_in_a_new_cache(tmp_path):
    model = hourglass_model(3, upsampling="linear")
    ids = random_ids(2, 14)
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :8], use_cache=True).cache
        cache.save(tmp_path / "state.safetensors")
        restored = SonettCache.load(tmp_path / "state.safetensors", model.config)
        assert restored.hourglass is not None and len(restored.hourglass.cohorts) == 1
        rest = model(ids[:, 8:], cache=restored, use_cache=True).logits
    assert max_diff(rest, full[:, 8:]) <= 1e-4


def test_cache_file_of_a_flat_model_does_not_load_into_an_hourglass_model(tmp_path):
    flat = tiny_model(
        "full", layer_types=HOURGLASS_MODEL_KINDS, num_hidden_layers=len(HOURGLASS_MODEL_KINDS), linear_feature_dim=4
    )
    with torch.no_grad():
        cache = flat(random_ids(1, 6), use_cache=True).cache
    cache.save(tmp_path / "flat.safetensors")
    with pytest.raises(ValueError, match="hierarchy"):
        SonettCache.load(tmp_path / "flat.safetensors", hourglass_model(2).config)


def test_gradients_reach_every_shortened_layer_and_match_with_activation_checkpointing():
    model = hourglass_model(2).train()
    ids = random_ids(2, 11)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in ("model.hourglass.shorten_proj.weight", "model.hourglass.upsample_proj.weight"):
        assert grads[0][name].abs().sum() > 0, name
    for i in range(1, 5):
        assert grads[0][f"model.layers.{i}.mlp.down_proj.weight"].abs().sum() > 0, i
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert max_diff(grads[0][name], grads[1][name]) <= 1e-5, name


def test_save_and_load_give_identical_logits(tmp_path):
    model = hourglass_model(3, pooling="mean")
    model.save_pretrained(tmp_path)
    loaded = SonettForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.hierarchy == model.config.hierarchy
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_hidden_states_hold_the_shortened_sequence_inside_the_span():
    model = hourglass_model(2)
    with torch.no_grad():
        out = model(random_ids(1, 9), output_hidden_states=True)
    shapes = [tuple(h.shape[1:2]) for h in out.hidden_states]
    assert len(shapes) == len(HOURGLASS_MODEL_KINDS) + 1
    assert shapes == [(9,)] + [(5,)] * 4 + [(9,)] * 3  # positions 0..8 form groups 0..4


@pytest.mark.parametrize(
    ("hierarchy", "message"),
    [
        ({"shorten_factor": 1, "start_layer": 1, "end_layer": 2}, "shorten_factor'] must be >= 2"),
        ({"shorten_factor": 2, "start_layer": 0, "end_layer": 2}, "strictly inside"),
        ({"shorten_factor": 2, "start_layer": 1, "end_layer": 3}, "strictly inside"),
        ({"shorten_factor": 2, "start_layer": 2, "end_layer": 2}, "strictly inside"),
        ({"shorten_factor": 2, "start_layer": 1}, "missing \\['end_layer'\\]"),
        ({"shorten_factor": 2, "start_layer": 1, "end_layer": 2, "levels": 2}, "unknown keys \\['levels'\\]"),
        ({"shorten_factor": 2, "start_layer": 1, "end_layer": 2, "pooling": "max"}, "pooling'\\] = 'max'"),
        ({"shorten_factor": 2, "start_layer": 1, "end_layer": 2, "upsampling": "conv"}, "upsampling'\\] = 'conv'"),
        ({"shorten_factor": 2.5, "start_layer": 1, "end_layer": 2}, "must be an integer"),
        ([2, 1, 2], "must be a dict"),
    ],
)
def test_invalid_hierarchy_is_refused_with_the_field_name(hierarchy, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("mixed", hierarchy=hierarchy)


def test_hierarchy_round_trips_through_the_config_file(tmp_path):
    config = tiny_config("mixed", hierarchy={"shorten_factor": 2, "start_layer": 1, "end_layer": 2})
    config.save_pretrained(tmp_path)
    assert SonettConfig.from_pretrained(tmp_path).hierarchy == config.hierarchy
    assert list(config.hierarchy_span()) == [1]


def test_assisted_decoding_rollback_is_refused():
    model = hourglass_model(2)
    with torch.no_grad():
        cache = model(random_ids(1, 5), use_cache=True).cache
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(2)


def test_model_card_describes_the_hierarchy():
    from sonett.hub.model_card import render_model_card

    card = render_model_card(hourglass_model(2).config, num_parameters=1000, results={}, model_name="hg")
    assert "layers 1-4 run on the sequence shortened 2x (hourglass, linear pooling, repeat upsampling)" in card


def test_padded_cached_hidden_states_of_the_span_cover_every_row():
    """Rows in two cohorts: the span's recorded inputs are assembled per row, as without a cache."""
    model = hourglass_model(2)
    rows = [random_ids(1, n, seed=n)[0] for n in (7, 8, 6)]
    input_ids, attention_mask = left_pad(rows)
    with torch.no_grad():
        cached = model(input_ids, attention_mask=attention_mask, use_cache=True, output_hidden_states=True)
        plain = model(input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    assert len(cached.cache.hourglass.cohorts) == 2
    width = 4  # the longest row, positions 0..7, completes groups 0..3 (at positions 0, 2, 4, 6)
    for layer in range(1, 5):
        assert cached.hidden_states[layer].shape == (3, width, 32)
        for i, row in enumerate(rows):
            real = (len(row) + 1) // 2  # complete groups of a row of this length: ceil(n / 2)
            assert max_diff(cached.hidden_states[layer][i, -real:], plain.hidden_states[layer][i, -real:]) <= 1e-5


def test_reordered_and_reloaded_cache_with_several_cohorts_continues_exactly(tmp_path):
    """Beam-style reordering that merges and drops cohorts, repetition, selection and a file round trip."""
    model = hourglass_model(3)
    rows = [random_ids(1, n, seed=n)[0] for n in (7, 8, 9)]
    input_ids, attention_mask = left_pad(rows)
    nxt = random_ids(4, 5, seed=9)
    with torch.no_grad():
        cache = model(input_ids, attention_mask=attention_mask, use_cache=True).cache
        assert len(cache.hourglass.cohorts) == 3
        cache.reorder_cache(torch.tensor([2, 0, 0]))
        cache.batch_repeat_interleave(2)  # rows 2, 2, 0, 0, 0, 0
        cache.batch_select_indices(torch.tensor([0, 2, 3, 5]))  # rows 2, 0, 0, 0
        cache.save(tmp_path / "state.safetensors")
        cache = SonettCache.load(tmp_path / "state.safetensors", model.config)
        order = [2, 0, 0, 0]
        mask = attention_mask[order]
        steps = []
        for t in range(nxt.shape[1]):
            mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], dim=1)
            steps.append(model(nxt[:, t : t + 1], attention_mask=mask, cache=cache).logits[:, -1])
        for i, row in enumerate(order):
            alone = model(torch.cat([rows[row], nxt[i]])[None]).logits[0, -nxt.shape[1] :]
            assert max_diff(torch.stack([step[i] for step in steps]), alone) <= 1e-4, i


def test_a_cache_without_hourglass_state_is_refused():
    model = hourglass_model(2)
    flat_cache = SonettCache(model.config, with_hourglass=False)
    with pytest.raises(ValueError, match="no hourglass state"):
        model(random_ids(1, 4), cache=flat_cache, use_cache=True)


def test_a_prepared_4d_mask_is_refused():
    """A bidirectional mask; block-diagonal causal ones are honoured (tests/model/test_hardening_inputs.py)."""
    model = hourglass_model(2)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="hierarchy.*block-diagonal causal"):
        model(random_ids(1, 4), attention_mask=mask)


def test_hierarchy_defaults_are_spelled_out():
    short = tiny_config("mixed", hierarchy={"shorten_factor": 2, "start_layer": 1, "end_layer": 2})
    assert short.hierarchy == {
        "shorten_factor": 2,
        "start_layer": 1,
        "end_layer": 2,
        "pooling": "linear",
        "upsampling": "repeat",
    }
    with pytest.raises(ValueError, match="at least 3 layers"):
        tiny_config("full", hierarchy={"shorten_factor": 2, "start_layer": 1, "end_layer": 2})
