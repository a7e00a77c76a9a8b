"""Optional dependencies: which extra brings what, and one clear error when an extra is missing.

`pip install sonett` installs what inference needs (torch, transformers, safetensors, tokenizers, huggingface-hub,
jinja2). Everything else comes with an extra, e.g. `pip install "sonett[train]"` (see `pyproject.toml`). A tooling
module imports what its extra brings inside `with requires_extra("train"):`, so a missing package raises
`MissingExtraError` naming the install command instead of a bare `ModuleNotFoundError`:

    with requires_extra("train"):
        from accelerate import Accelerator
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# extra -> what it is for (the error message says it)
EXTRAS: dict[str, str] = {
    "train": "training and fine-tuning (accelerate, datasets, peft, tensorboard, matplotlib)",
    "vision": "images (Pillow)",
    "eval": "evaluation and benchmarks (evaluate, lm-eval, matplotlib, psutil)",
    "serve": "the OpenAI-compatible server (fastapi, uvicorn, pydantic)",
    "gpu": "the fused GPU kernels (flash-linear-attention)",
    "deepspeed": "DeepSpeed ZeRO training",
}


class MissingExtraError(ModuleNotFoundError):
    """A package of an optional extra is not installed; the message names `pip install "sonett[EXTRA]"`."""


def install_command(extra: str) -> str:
    """The command that installs `extra`, e.g. `pip install "sonett[train]"`."""
    if extra not in EXTRAS:
        raise ValueError(f"Unknown extra {extra!r}; the extras are {sorted(EXTRAS)}.")
    return f'pip install "sonett[{extra}]"'


def missing_extra_error(module: str, extra: str) -> MissingExtraError:
    """The error for a missing `module` (a top-level package name) that `extra` installs."""
    error = MissingExtraError(
        f"This needs the package {module!r}, which is not installed. It comes with sonett's `{extra}` extra, "
        f"for {EXTRAS[extra]}: {install_command(extra)}"
    )
    error.name = module
    return error


@contextmanager
def requires_extra(extra: str) -> Iterator[None]:
    """Turn a `ModuleNotFoundError` raised by the imports in this block into `MissingExtraError` naming `extra`."""
    install_command(extra)  # checks the name
    try:
        yield
    except MissingExtraError:
        raise
    except ModuleNotFoundError as error:
        module = (error.name or str(error)).split(".")[0]
        raise missing_extra_error(module, extra) from error
