"""Evaluation: perplexity, synthetic recall tasks, lm-eval harness and comparisons against Llama."""
