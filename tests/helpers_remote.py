"""Fresh-interpreter helpers for the remote-code tests: a script preamble that makes the `sonett` package
unimportable (so everything runs from a saved folder's own code), the child environment such a script runs in, and
the layer mixes those tests save."""

import os
import textwrap

EVERY_KIND = ["linear_attention", "sliding_attention", "memory_attention", "full_attention"]
HOURGLASS_KINDS = [
    "linear_attention",
    "full_attention",
    "linear_attention",
    "sliding_attention",
    "memory_attention",
    "linear_attention",
]

# Opens every fresh-interpreter script: the package must not be importable, so everything comes from the folder.
NO_PACKAGE_PREAMBLE = textwrap.dedent(
    """
    import sys

    sys.modules["sonett"] = None
    try:
        import sonett  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("sonett is importable")
    """
)


def fresh_process_env(tmp_path):
    """The environment of a child interpreter: no PYTHONPATH (no package), offline, its own empty HF_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env
