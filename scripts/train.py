#!/usr/bin/env python
"""Pretrain a Sonett preset with Accelerate, write a Hub-ready folder, reload it and generate a sample.

With no flags this is `make demo`: the tiny preset on the Python standard library's own source.
Every field of `sonett.training.PretrainArguments` is a flag, e.g.

    python scripts/train.py --config sonett-small --data_files corpus.jsonl --max_steps 20000
    accelerate launch --config_file configuration/accelerate/... scripts/train.py --config sonett-small
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from sonett.training import PretrainArguments, pretrain

SAMPLE_PROMPT = "def read_config(path):\n    "


def generate_sample(folder: str, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 60) -> str:
    """Reload `folder` through the Auto classes (remote code) and greedily continue `prompt`."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses()
    started = time.perf_counter()
    results = pretrain(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    sample = generate_sample(args.output_dir)
    print(f"\nparameters:            {results['parameters']:,}")
    print(f"steps x tokens:        {results['steps']} x {results['batch_tokens']} = {results['tokens_seen']:,}")
    print(f"training throughput:   {results['train_tokens_per_second']:,.0f} tokens/s")
    print(f"validation loss:       {results['validation_loss']:.4f}")
    print(f"validation perplexity: {results['validation_perplexity']:.2f} ({results['validation_tokens']:,} tokens)")
    print(f"wall time:             {time.perf_counter() - started:.0f} s")
    print(f"model folder:          {args.output_dir}")
    print("\nsample (reloaded with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)):")
    print(sample)


if __name__ == "__main__":
    sys.exit(main())
