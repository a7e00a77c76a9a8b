"""Without autograd, a long input runs through the SwiGLU MLP in chunks: the same result, a fraction of the memory."""

import pytest
import torch
from helpers_memory import peak_allocated_bytes
from helpers_model import tiny_config

from sonett.model import layers_sonett
from sonett.model.layers_sonett import MLP_CHUNK_TOKENS, SonettMLP


def make_mlp() -> SonettMLP:
    torch.manual_seed(0)
    return SonettMLP(tiny_config("mixed", hidden_size=32, intermediate_size=96))


@pytest.mark.parametrize("shape", [(1, 2 * MLP_CHUNK_TOKENS + 5), (3, 1500)])  # 4101 tokens; 4500 over rows
def test_chunked_mlp_equals_one_call(shape):
    mlp = make_mlp()
    hidden = torch.randn(*shape, 32)
    reference = mlp.swiglu(hidden)  # one call, with autograd
    assert reference.requires_grad
    with torch.no_grad():
        chunked = mlp(hidden)
    assert chunked.shape == hidden.shape
    # Each token's row is computed alone either way; only the BLAS kernel chosen for a chunk may round differently.
    torch.testing.assert_close(chunked, reference.detach(), rtol=0, atol=1e-6)


def test_small_chunks_equal_one_call(monkeypatch):
    monkeypatch.setattr(layers_sonett, "MLP_CHUNK_TOKENS", 7)  # chunk edges inside rows and across them
    mlp = make_mlp()
    hidden = torch.randn(2, 25, 32)
    with torch.no_grad():
        chunked = mlp(hidden)
    torch.testing.assert_close(chunked, mlp.swiglu(hidden).detach(), rtol=0, atol=1e-6)


def test_training_keeps_one_call():
    mlp = make_mlp()
    calls = []
    mlp.gate_proj.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    hidden = torch.randn(1, 2 * MLP_CHUNK_TOKENS + 5, 32, requires_grad=True)
    mlp(hidden).sum().backward()
    assert calls == [hidden.shape]
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_long_prefill_never_holds_a_full_activation():
    mlp = make_mlp()
    tokens = 8 * MLP_CHUNK_TOKENS
    hidden = torch.randn(1, tokens, 32)
    one_activation = tokens * 96 * 4  # (tokens, intermediate_size) fp32; one call holds three of these at once
    with torch.no_grad():
        peak = peak_allocated_bytes(lambda: mlp(hidden))
    output = hidden.nbytes
    assert peak < output + one_activation / 2, (peak, output, one_activation)
