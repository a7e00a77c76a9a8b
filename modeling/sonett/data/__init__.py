"""Data: the embedded corpus, instruction data, generated images and tokenizer training."""
