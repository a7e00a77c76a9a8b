"""Train Sonett's byte-level BPE tokenizer on a corpus and save it as a tokenizer folder.

python scripts/train_tokenizer.py --output_dir runs/tokenizer                 # the stdlib corpus
python scripts/train_tokenizer.py --data_files a.jsonl b.jsonl --vocab_size 32000 --output_dir tok
"""

from __future__ import annotations

import argparse
import logging
import sys

from sonett.data.corpus import load_corpus
from sonett.data.tokenizer import train_bpe_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write the tokenizer to")
    parser.add_argument("--data_files", nargs="*", default=None, help="local .txt/.jsonl/.parquet files")
    parser.add_argument("--dataset_name", default=None, help="a Hub dataset name (needs network)")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--model_max_length", type=int, default=4096)
    args = parser.parse_args(argv)
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
