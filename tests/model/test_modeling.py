"""SonettForCausalLM: the invariants of docs/design.md on tiny fp32 CPU models, for each layer mix."""

import copy
import warnings

import pytest
import torch
from helpers_model import (
    LAYER_MIXES,
    PAD,
    VOCAB,
    WINDOW,
    assert_decoding_reads_the_cache,
    left_pad,
    max_diff,
    mixes,
    random_ids,
    tiny_config,
    tiny_model,
)
from torch import nn
from transformers import Trainer, TrainingArguments

from sonett import SonettCache, SonettForCausalLM
from sonett.model.modeling_sonett import SonettDecoderLayer

PROMPT_LEN = 12  # longer than WINDOW, so the sliding cache has to trim


def n_sliding(mix):
    return LAYER_MIXES[mix].count("sliding_attention")


# ----------------------------------------------------------------------------------------------------------
# Invariant 1: incremental decoding equals the full forward
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@mixes
def test_prefill_then_decode_matches_full_forward(mix, attn, with_mask):
    model = tiny_model(mix, attn_implementation=attn)
    ids = random_ids(2, PROMPT_LEN)
    prefill = 5
    with torch.no_grad():
        full = model(ids).logits
        mask = torch.ones_like(ids)
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill] if with_mask else None, use_cache=True)
        assert isinstance(out.cache, SonettCache)
        steps = [out.logits]
        cache = out.cache
        for t in range(prefill, PROMPT_LEN):
            out = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1] if with_mask else None,
                cache=cache,
                use_cache=True,
            )
            assert out.cache is cache
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    assert incremental.shape == full.shape
    assert max_diff(incremental, full) <= 1e-4
    assert cache.get_seq_length() == PROMPT_LEN


@pytest.mark.parametrize("chunks", [(5, 4, 3), (2, 7, 3), (8, 4)], ids=["5-4-3", "2-7-3", "8-4"])
@mixes
def test_chunked_prefill_matches_full_forward(mix, chunks):
    model = tiny_model(mix)
    ids = random_ids(2, sum(chunks), seed=3)
    with torch.no_grad():
        full = model(ids).logits
        cache = SonettCache(model.config)
        pieces, start = [], 0
        for size in chunks:
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            pieces.append(out.logits)
            start += size
        # one more decode step after the chunks
        nxt = random_ids(2, 1, seed=4)
        step = model(nxt, cache=cache, use_cache=True).logits
        reference = model(torch.cat([ids, nxt], dim=1)).logits
    assert max_diff(torch.cat(pieces, dim=1), full) <= 1e-4
    assert max_diff(step[:, -1], reference[:, -1]) <= 1e-4


@mixes
def test_decoding_reads_the_cache_kwarg(mix):
    """Decoding with `cache=` must really read the cache (a model that ignores it gives other logits)."""
    assert_decoding_reads_the_cache(tiny_model(mix), random_ids(1, PROMPT_LEN))


@mixes
def test_sliding_cache_trims_and_full_cache_keeps_everything(mix):
    model = tiny_model(mix)
    ids = random_ids(2, PROMPT_LEN)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache
        kv_heads, head_dim = model.config.num_key_value_heads, model.config.head_dim

        def check(total):
            assert cache.get_seq_length() == total
            for kind, layer in zip(LAYER_MIXES[mix], cache.layers):
                expected = WINDOW - 1 if kind == "sliding_attention" else total
                assert layer.keys.shape == (2, kv_heads, expected, head_dim), kind
                assert layer.values.shape == (2, kv_heads, expected, head_dim), kind

        check(PROMPT_LEN)
        for step in range(3):
            model(random_ids(2, 1, seed=10 + step), cache=cache, use_cache=True)
        check(PROMPT_LEN + 3)
    full_layers = len(LAYER_MIXES[mix]) - n_sliding(mix)
    per_token = 2 * 2 * kv_heads * head_dim * 4  # keys + values, batch 2, fp32
    assert cache.nbytes() == per_token * (n_sliding(mix) * (WINDOW - 1) + full_layers * (PROMPT_LEN + 3))


def test_cache_layer_classes_follow_layer_types():
    config = tiny_config("mixed")
    cache = SonettCache(config)
    assert [layer.is_sliding for layer in cache.layers] == [True, False, True]
    assert cache.layers[0].sliding_window == WINDOW


@mixes
def test_use_cache_false_returns_no_cache(mix):
    model = tiny_model(mix)
    with torch.no_grad():
        assert model(random_ids(1, 6), use_cache=False).cache is None
        assert model(random_ids(1, 6)).cache is not None  # config.use_cache at inference


# ----------------------------------------------------------------------------------------------------------
# Invariant 3: causality
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("t", [2, 6])
@mixes
def test_causality(mix, t, attn):
    model = tiny_model(mix, attn_implementation=attn)
    length = 16
    ids = random_ids(1, length, seed=5)
    changed = ids.clone()
    changed[0, t + 1] = (ids[0, t + 1] - 3 + 1) % (VOCAB - 3) + 3
    with torch.no_grad():
        a = model(ids, output_hidden_states=True)
        b = model(changed, output_hidden_states=True)
    assert max_diff(a.logits[:, : t + 1], b.logits[:, : t + 1]) <= 1e-6
    assert max_diff(a.logits[:, t + 1], b.logits[:, t + 1]) > 1e-3
    if mix == "sliding":
        # Each sliding layer sees WINDOW - 1 tokens back, so a token reaches at most that far per layer.
        reach = t + 1 + n_sliding(mix) * (WINDOW - 1)
        assert max_diff(a.logits[:, reach], b.logits[:, reach]) > 1e-4
        assert max_diff(a.logits[:, reach + 1 :], b.logits[:, reach + 1 :]) <= 1e-6
    else:
        diffs = (a.logits[0, t + 1 :] - b.logits[0, t + 1 :]).abs().amax(-1)
        assert bool((diffs > 1e-4).all()), diffs


# ----------------------------------------------------------------------------------------------------------
# Invariant 4: left padding
# ----------------------------------------------------------------------------------------------------------

ROW_LENGTHS = (12, 7, 3, 10)


def padded_batch():
    rows = [random_ids(1, n, seed=20 + i)[0] for i, n in enumerate(ROW_LENGTHS)]
    input_ids, attention_mask = left_pad(rows)
    return rows, input_ids, attention_mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@mixes
def test_left_padded_batch_matches_rows_alone(mix, attn):
    model = tiny_model(mix, attn_implementation=attn)
    rows, input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        batched = model(input_ids, attention_mask=attention_mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            assert max_diff(batched[i, -len(row) :], alone) <= 1e-5, (mix, i)


@mixes
def test_left_padded_decode_matches_rows_alone(mix):
    """Prefill a padded batch, then decode one token per row through the cache."""
    model = tiny_model(mix)
    rows, input_ids, attention_mask = padded_batch()
    nxt = random_ids(len(rows), 2, seed=30)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, use_cache=True)
        cache = out.cache
        steps = []
        for j in range(2):
            attention_mask = torch.cat([attention_mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            steps.append(model(nxt[:, j : j + 1], attention_mask=attention_mask, cache=cache).logits[:, -1])
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, nxt[i]])[None]).logits[0, -2:]
            got = torch.stack([steps[0][i], steps[1][i]])
            assert max_diff(got, alone) <= 1e-5, (mix, i)


def test_position_ids_are_derived_from_the_padding_mask():
    """RoPE is shift-invariant, so logits cannot show wrong offsets; check the positions themselves."""
    model = tiny_model("mixed")
    seen = []
    model.model.rotary_emb.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    rows, input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        cache = model(input_ids, attention_mask=attention_mask, use_cache=True).cache
        prefill_positions = seen[-1]
        attention_mask = torch.cat([attention_mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        model(random_ids(len(rows), 1), attention_mask=attention_mask, cache=cache)
        decode_positions = seen[-1]
        model(random_ids(1, 3), cache=SonettCache(model.config))
        no_mask_positions = seen[-1]
    for i, row in enumerate(rows):
        assert prefill_positions[i, -len(row) :].tolist() == list(range(len(row)))
        assert decode_positions[i].tolist() == [len(row)]
    assert no_mask_positions.tolist() == [[0, 1, 2]]


@mixes
def test_left_padded_greedy_generate_matches_rows_alone(mix):
    model = tiny_model(mix)
    rows, input_ids, attention_mask = padded_batch()
    new = 6
    with torch.no_grad():
        batched = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD
        )
        for i, row in enumerate(rows):
            alone = model.generate(row[None], max_new_tokens=new, do_sample=False, pad_token_id=PAD)
            assert torch.equal(batched[i, -new:], alone[0, -new:]), (mix, i)
            assert torch.equal(alone[0, : len(row)], row)


# ----------------------------------------------------------------------------------------------------------
# Attention backends
# ----------------------------------------------------------------------------------------------------------


@mixes
def test_eager_and_sdpa_agree_with_padding(mix):
    _, input_ids, attention_mask = padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():
        eager = tiny_model(mix, attn_implementation="eager")(input_ids, attention_mask=attention_mask).logits
        sdpa = tiny_model(mix, attn_implementation="sdpa")(input_ids, attention_mask=attention_mask).logits
    assert max_diff(eager[real], sdpa[real]) <= 1e-5


@mixes
def test_flex_attention_agrees_with_eager_under_no_grad(mix):
    # FlexAttention has no backward on CPU (a torch limitation), so compare forward only.
    _, input_ids, attention_mask = padded_batch()
    real = attention_mask.bool()
    flex_model = tiny_model(mix, attn_implementation="flex_attention")
    assert flex_model.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        eager = tiny_model(mix, attn_implementation="eager")(input_ids, attention_mask=attention_mask).logits
        flex = flex_model(input_ids, attention_mask=attention_mask).logits
    assert max_diff(eager[real], flex[real]) <= 1e-5


def test_default_attention_is_sdpa_and_switchable():
    model = tiny_model("mixed")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert model.model.layers[0].mixer.config._attn_implementation == "eager"


# ----------------------------------------------------------------------------------------------------------
# Invariant 7: activation checkpointing and gradient accumulation
# ----------------------------------------------------------------------------------------------------------


def grads_of(model, ids, labels, attention_mask):
    model.zero_grad()
    loss = model(ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@mixes
def test_activation_checkpointing_gives_same_gradients(mix):
    model = tiny_model(mix).train()
    _, ids, attention_mask = padded_batch()
    labels = ids.masked_fill(attention_mask == 0, -100)
    loss_plain, plain = grads_of(model, ids, labels, attention_mask)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.model.layers)

    calls = []
    mlp = model.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or forward(x)  # module hooks do not fire in the recompute
    loss_ckpt, ckpt = grads_of(model, ids, labels, attention_mask)
    del mlp.forward
    assert len(calls) == 2, "the checkpointed layer must be recomputed in backward"

    assert abs(loss_plain - loss_ckpt) <= 1e-6
    assert plain.keys() == ckpt.keys()
    assert len(plain) == len(list(model.parameters()))
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name


def test_loss_with_num_items_in_batch_is_token_sum_over_n():
    model = tiny_model("mixed")
    _, ids, attention_mask = padded_batch()
    labels = ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, labels=labels)
        token_sum = nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        n_valid = int((labels[:, 1:] != -100).sum())
        assert torch.allclose(out.loss, token_sum / n_valid, atol=1e-6)
        n = 57
        loss_n = model(ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=n).loss
        assert torch.allclose(loss_n, token_sum / n, atol=1e-6)
        loss_t = model(ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(n)).loss
        assert torch.allclose(loss_t, token_sum / n, atol=1e-6)


SEQ_LENGTHS = (3, 17, 4, 15, 16, 5, 14, 6)


def lm_dataset():
    data = []
    for i, n in enumerate(SEQ_LENGTHS):
        ids = random_ids(1, n, seed=100 + i)[0].tolist()
        data.append({"input_ids": ids, "labels": list(ids)})
    return data


def pad_collator(features):
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), PAD, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_once(model, tmp_path, batch, accumulation, steps=2):
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}_ga{accumulation}"),
        use_cpu=True,
        report_to=[],
        max_steps=steps,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        seed=7,
        train_sampling_strategy="sequential",
        dataloader_drop_last=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), data_collator=pad_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_gradient_accumulation_matches_large_batch(tmp_path):
    base = tiny_model("mixed")
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    losses_big, weights_big = train_once(copy.deepcopy(base), tmp_path, batch=4, accumulation=1)
    losses_ga, weights_ga = train_once(copy.deepcopy(base), tmp_path, batch=2, accumulation=2)

    assert len(losses_big) == len(losses_ga) == 2
    for big, ga in zip(losses_big, losses_ga):
        assert ga == pytest.approx(big, rel=1e-5)
    moved = max(max_diff(weights_big[n], start[n]) for n in start)
    assert moved > 1e-3, "training must change the weights"
    for name in weights_big:
        assert torch.allclose(weights_big[name], weights_ga[name], atol=1e-6), name

    # The lengths differ so much that averaging each micro-batch separately would give another loss.
    data = pad_collator(lm_dataset()[:4])
    with torch.no_grad():
        whole = base(**data).loss
        halves = [base(**pad_collator(lm_dataset()[i : i + 2])).loss for i in (0, 2)]
    assert whole.item() == pytest.approx(losses_big[0], rel=1e-5)
    assert abs((halves[0] + halves[1]).item() / 2 - whole.item()) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Heads, outputs and parallel plans
# ----------------------------------------------------------------------------------------------------------


def test_embeddings_are_tied_by_default():
    model = tiny_model("mixed")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head


def test_untied_embeddings_are_independent():
    model = tiny_model("mixed", tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    before = model.lm_head.weight.clone()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(model.lm_head.weight, before)


@mixes
def test_output_hidden_states(mix):
    model = tiny_model(mix)
    ids = random_ids(2, 8)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    n_layers = len(LAYER_MIXES[mix])
    assert len(out.hidden_states) == n_layers + 1
    assert all(h.shape == (2, 8, 32) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))
    assert max_diff(model.lm_head(out.hidden_states[-1]), out.logits) <= 1e-6
    with torch.no_grad():
        assert model(ids).hidden_states is None


@mixes
def test_output_attentions_with_eager(mix):
    model = tiny_model(mix, attn_implementation="eager")
    ids = random_ids(2, 10)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    heads = model.config.num_attention_heads
    assert len(out.attentions) == len(LAYER_MIXES[mix])
    for kind, weights in zip(LAYER_MIXES[mix], out.attentions):
        assert weights.shape == (2, heads, 10, 10)
        assert torch.allclose(weights.sum(-1), torch.ones(2, heads, 10), atol=1e-5)
        assert float(weights.triu(1).abs().max()) == 0.0  # causal
        if kind == "sliding_attention":
            assert float(weights.tril(-WINDOW).abs().max()) == 0.0  # nothing beyond the window
        else:
            assert float(weights[..., -1, 0].min()) > 0.0


def test_no_split_modules_and_parallel_plans():
    model = tiny_model("mixed")
    assert "SonettDecoderLayer" in model._no_split_modules
    assert SonettDecoderLayer.__name__ == "SonettDecoderLayer"
    plan = model.tp_plan
    # The MLPs only: a `layers.*.mixer` rule would also match linear and memory mixers (issue 14, item 8).
    assert not any(".mixer." in pattern for pattern in plan)
    for name in ("gate_proj", "up_proj"):
        assert plan[f"model.layers.*.mlp.{name}"] == "colwise"
    assert plan["model.layers.*.mlp.down_proj"] == "rowwise"
    assert "lm_head" in plan
    assert model.pp_plan == {}  # no pipeline-parallel plan: none is tested
    # every plan entry names real modules
    module_names = {name for name, _ in model.named_modules()}
    for pattern in plan:
        prefix = pattern.replace(".*.", ".0.")
        assert prefix in module_names, pattern


@mixes
def test_logits_to_keep(mix):
    model = tiny_model(mix)
    ids = random_ids(2, 9)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        two = model(ids, logits_to_keep=2).logits
    assert last.shape == (2, 1, VOCAB)
    assert max_diff(last[:, 0], full[:, -1]) <= 1e-6
    assert max_diff(two, full[:, -2:]) <= 1e-6


def test_inputs_embeds_equal_input_ids():
    model = tiny_model("mixed")
    ids = random_ids(2, 9)
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.model.embed_tokens(ids)).logits
    assert max_diff(a, b) <= 1e-6


def test_base_model_and_head_agree():
    model = tiny_model("mixed")
    ids = random_ids(1, 7)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        assert max_diff(model.lm_head(hidden), model(ids).logits) <= 1e-6
    assert isinstance(model, SonettForCausalLM)
    assert model.can_generate()
    assert not model.model.can_generate()
