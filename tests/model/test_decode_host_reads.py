"""A decode step reads nothing back from the device (issue 17): `generate` validates the prompt once, and every
later step runs without `bool(tensor)`, `.item()`, `.tolist()` or `int(tensor)`, so on a GPU the host never waits
for the device between tokens. The trap turns each such read into an error inside the decode steps' forward."""

from contextlib import contextmanager
from functools import wraps

import pytest
import torch
from helpers_model import PAD, left_pad, random_ids, tiny_model

EVERY_KIND = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")


class HostReadError(AssertionError):
    pass


@contextmanager
def host_reads_forbidden():
    """Every host read of a tensor's value raises `HostReadError` inside the block."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def trap(name):
        def read(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} read a value back to the host in a decode step")

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def trap_decode_steps(model):
    """Wrap `model.forward` so that every call after the first (the prompt's) runs under the trap."""
    original = model.forward
    calls = []

    @wraps(original)  # generate reads the signature
    def forward(*args, **kwargs):
        calls.append(kwargs.get("input_ids").shape[1] if kwargs.get("input_ids") is not None else None)
        if len(calls) == 1:
            return original(*args, **kwargs)
        with host_reads_forbidden():
            return original(*args, **kwargs)

    model.forward = forward
    return calls


def every_kind_model(**overrides):
    return tiny_model("mixed", layer_types=EVERY_KIND, num_hidden_layers=len(EVERY_KIND), **overrides)


@pytest.mark.parametrize("implementation", [None, "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_generate_decode_steps_read_nothing_back(implementation, padded):
    model = every_kind_model()
    if padded:
        input_ids, attention_mask = left_pad([random_ids(1, 7, seed=3)[0], random_ids(1, 4, seed=4)[0]])
    else:
        input_ids = random_ids(2, 7, seed=3)
        attention_mask = torch.ones_like(input_ids)
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": PAD}
    with torch.no_grad():
        want = model.generate(input_ids, attention_mask=attention_mask, cache_implementation=implementation, **kwargs)
        calls = trap_decode_steps(model)
        got = model.generate(input_ids, attention_mask=attention_mask, cache_implementation=implementation, **kwargs)
    assert calls == [7, 1, 1, 1, 1]  # the prompt, then four one-token decode steps, all under the trap
    assert torch.equal(got, want)


def test_a_bad_prompt_is_still_refused_by_name():
    model = every_kind_model()
    bad = random_ids(1, 5)
    bad[0, 2] = 10_000
    with pytest.raises(ValueError, match="Token id 10000 is out of range"):
        model.generate(bad, max_new_tokens=2, do_sample=False, pad_token_id=PAD)


def test_generate_keeps_the_signature_clients_inspect():
    import inspect

    parameters = inspect.signature(every_kind_model().generate).parameters
    assert {"inputs", "generation_config", "logits_processor", "stopping_criteria"} <= set(parameters)


def test_the_trap_catches_a_host_read():
    with host_reads_forbidden(), pytest.raises(HostReadError):
        bool(torch.ones(1))
