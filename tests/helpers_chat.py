"""A tiny chat folder whose model deterministically answers every prompt with REPLY, then `<|end|>`, then (if
nothing stops it) starts the same reply again: the reference for tests of where chat generation stops.

The model is a "bigram" Sonett: every mixer and MLP writes zero into the residual stream (zeroed `o_proj` and
`down_proj`), so the logits depend on the last token only; the embeddings and the untied `lm_head` are set so
that the end of the assistant prompt ("\\n") -> REPLY's tokens -> `<|end|>` -> "\\n" -> REPLY's tokens -> ...
"""

import torch

from sonett import SonettConfig, SonettForCausalLM
from sonett.data.tokenizer import TURN_END_TOKEN, train_bpe_tokenizer
from sonett.hub.saving import write_model_folder

CORPUS = ["a picture of a cat", "what is in this image?", "the red square and the blue square"] * 4
REPLY = "a red cat"
# Every kind, so that config.json holds the kinds transformers does not know (memory_attention, linear_attention).
LAYER_TYPES = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
MESSAGES = [{"role": "user", "content": "what is in this image?"}]


def chat_tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


def bigram_chat_model(tokenizer, seed: int = 0) -> SonettForCausalLM:
    """A SonettForCausalLM that continues the assistant prompt with REPLY + `<|end|>` + "\\n" + REPLY + ..."""
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    newline = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    reply = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids(TURN_END_TOKEN)
    chain = [newline, *reply, end]
    assert len(set(chain)) == len(chain), "the chain's tokens must differ, or the bigram model is ambiguous"
    config = SonettConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=list(LAYER_TYPES),
        sliding_window=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = SonettForCausalLM(config).eval()
    hidden = config.hidden_size
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings.normal_(0.0, 0.02)
        model.lm_head.weight.zero_()
        for slot, (token, following) in enumerate(zip(chain, [*chain[1:], newline])):
            embeddings[token] = torch.nn.functional.one_hot(torch.tensor(slot), hidden).float()
            model.lm_head.weight[following, slot] = 10.0
    return model


def save_chat_folder(folder, seed: int = 0):
    """Write the bigram chat model and its tokenizer as training writes the demo folder (`write_model_folder`)."""
    tokenizer = chat_tokenizer()
    model = bigram_chat_model(tokenizer, seed=seed)
    write_model_folder(model, tokenizer, folder, results={"training_data": "none: weights set by hand"})
    return model, tokenizer
