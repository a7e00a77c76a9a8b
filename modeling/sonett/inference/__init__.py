"""Inference: conversations with a persistent memory and the OpenAI-compatible server."""
