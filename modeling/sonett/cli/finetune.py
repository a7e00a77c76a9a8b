"""Fine-tune a Sonett model with LoRA (or DoRA) on chat / instruction data through the transformers Trainer.

With no flags: adapts `runs/sonett-tiny` (from `make demo`) on the embedded instruction set and writes the adapter
to `runs/sonett-tiny-lora`. Flags are the fields of `sonett.training.finetuning.FinetuneArguments` plus every
`transformers.TrainingArguments` flag:

    sonett finetune --data_files chats.jsonl --lora_rank 8 --use_dora --merge
    sonett finetune --base_model my/model --num_train_epochs 1 --learning_rate 1e-3 --output_dir out
    accelerate launch -m sonett finetune --data_files chats.jsonl

Load the result with `AutoPeftModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)`, or the merged
folder (`--merge`) with `AutoModelForCausalLM.from_pretrained(output_dir + "/merged", trust_remote_code=True)`.
"""

from __future__ import annotations

import logging
import sys

import torch
from transformers import TrainingArguments

from sonett.cli.parsing import dataclass_parser
from sonett.extras import requires_extra
from sonett.hub.loading import load_tokenizer
from sonett.training.finetuning import TRAINING_DEFAULTS, FinetuneArguments, finetune, load_splits

SAMPLES = 4


def show_samples(adapter_dir: str, validation, count: int = SAMPLES) -> None:
    """Reload the adapter through `AutoPeftModelForCausalLM` and answer a few validation prompts greedily."""
    with requires_extra("train"):
        from peft import AutoPeftModelForCausalLM

    tokenizer = load_tokenizer(adapter_dir)  # no code of the folder runs (sonett.hub.loading)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, trust_remote_code=False).eval()
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    step = max(1, len(validation) // count)
    for messages in validation[::step]["messages"][:count]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        inputs = tokenizer.apply_chat_template(
            messages[:last], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=40, do_sample=False, eos_token_id=end_id)
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"\nQ: {messages[last - 1]['content']}\nexpected: {messages[last]['content']}\nmodel:    {answer}")


def build_parser():
    """The parser of `sonett finetune`: `FinetuneArguments` and every `TrainingArguments` flag, with the recipe's
    defaults (`TRAINING_DEFAULTS`)."""
    parser = dataclass_parser((FinetuneArguments, TrainingArguments), "finetune", __doc__)
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args, training_args = build_parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    splits = load_splits(args, training_args.seed)
    results = finetune(args, training_args, splits)
    if not training_args.should_save:  # another rank of a distributed run
        return results
    print(f"\nbase model:            {args.base_model}")
    print(
        f"trainable parameters:  {results['trainable_parameters']:,} of {results['all_parameters']:,} "
        f"({results['trainable_share']:.2%})"
    )
    print(f"examples:              {results['train_examples']} train, {results['validation_examples']} validation")
    print(f"steps:                 {results['steps']} ({results['train_seconds']:.0f} s)")
    print(f"validation loss:       {results['validation_loss_before']:.4f} -> {results['validation_loss_after']:.4f}")
    print(f"adapter:               {results['adapter_dir']}")
    if results["merged_dir"]:
        print(f"merged model:          {results['merged_dir']}")
    show_samples(results["adapter_dir"], splits["validation"])
    return results


if __name__ == "__main__":
    sys.exit(main())
