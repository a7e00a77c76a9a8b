"""Train Sonett's byte-level BPE tokenizer on a corpus and save it as a tokenizer folder.

    sonett train-tokenizer --output_dir runs/tokenizer                 # the stdlib corpus
    sonett train-tokenizer --data_files a.jsonl b.jsonl --vocab_size 32000 --output_dir tok

The tokenizer carries Sonett's chat template and special tokens; `sonett train --tokenizer FOLDER` uses it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sonett.cli.parsing import argument_parser, spellings
from sonett.data.corpus import load_corpus
from sonett.data.tokenizer import train_bpe_tokenizer


def build_parser() -> argparse.ArgumentParser:
    """The parser of `sonett train-tokenizer`."""
    parser = argument_parser("train-tokenizer", __doc__)
    parser.add_argument(*spellings("output_dir"), required=True, help="folder to write the tokenizer to")
    parser.add_argument(
        *spellings("data_files"), nargs="*", default=None, help="local .txt/.jsonl/.parquet files (default: stdlib)"
    )
    parser.add_argument(*spellings("dataset_name"), default=None, help="a Hub dataset name (needs network)")
    parser.add_argument(*spellings("text_column"), default="text", help="the column holding the documents")
    parser.add_argument(
        *spellings("vocab_size"),
        type=int,
        default=4096,
        help="vocabulary size, special tokens and the 256 bytes included",
    )
    parser.add_argument(
        *spellings("model_max_length"), type=int, default=4096, help="the longest input the tokenizer advertises"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    corpus = load_corpus(args.data_files, args.dataset_name, args.text_column)
    tokenizer = train_bpe_tokenizer(corpus[args.text_column], args.vocab_size, args.model_max_length)
    tokenizer.save_pretrained(args.output_dir)
    sample = "def main():\n    print('Grüße 🌍')\n"
    ids = tokenizer(sample)["input_ids"]
    print(f"{len(tokenizer)} tokens -> {args.output_dir}")
    round_trip = tokenizer.decode(ids) == sample
    print(f"{sample!r}: {len(ids)} tokens for {len(sample.encode())} bytes; exact round trip: {round_trip}")


if __name__ == "__main__":
    sys.exit(main())
