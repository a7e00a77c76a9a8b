#!/usr/bin/env python
"""Measure the README's hardening figures for the sonett package this Python imports (README, Reliability).

    python scripts/hardening_figures.py                 # every case, each in its own process
    python scripts/hardening_figures.py --case vocab

To compare with an earlier version, run the same script against that version's package:

    git worktree add ../sonett-old <commit>
    PYTHONPATH=../sonett-old/modeling python scripts/hardening_figures.py

Each case prints one line: what it loads, the error (if any), the time and the growth of the peak resident memory
(`ru_maxrss`) during that step. The cases use only public APIs, so they run on older versions too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("vocab", "chunk", "png", "eps")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_model(**overrides):
    import torch

    from sonett import SonettConfig, SonettForCausalLM

    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["linear_attention", "full_attention"],
        sliding_window=4,
        max_position_embeddings=256,
    )
    values.update(overrides)
    torch.manual_seed(0)
    return SonettForCausalLM(SonettConfig(**values)).eval()


def outcome(step) -> str:
    """Run `step`; return its error (or "no error"), its time and the peak-memory growth it caused."""
    before, started = peak_mib(), time.perf_counter()
    try:
        step()
        result = "no error"
    except Exception as error:  # the figure is which error, and how much it cost to get there
        result = f"{type(error).__name__}: {str(error).splitlines()[0][:110]}"
    return f"{result} | {time.perf_counter() - started:.2f} s, peak RSS growth {peak_mib() - before:,.0f} MiB"


def case_vocab(folder: Path) -> str:
    from sonett import SonettForCausalLM

    tiny_model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 25_000_000
    (folder / "config.json").write_text(json.dumps(config))
    return "from_pretrained, vocab_size 25,000,000 in config.json: " + outcome(
        lambda: SonettForCausalLM.from_pretrained(folder)
    )


def case_chunk(folder: Path) -> str:
    import torch

    model = tiny_model(linear_chunk_size=8192, layer_types=["linear_attention", "linear_attention"])
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        return "6-token forward at linear_chunk_size 8192: " + outcome(lambda: model(ids))


def case_png(folder: Path) -> str:
    from PIL import Image

    from sonett import SonettImageProcessor

    encoded = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(encoded, format="PNG")
    path = folder / "small-image-in-a-big-file.png"
    with path.open("wb") as handle:
        handle.write(encoded.getvalue())
        handle.truncate(600 * 1024 * 1024)  # sparse: no disk space used
    processor = SonettImageProcessor()
    return "a 4x4 PNG followed by 600 MB, by path: " + outcome(lambda: processor(str(path), return_tensors="pt"))


def case_eps(folder: Path) -> str:
    from sonett import SonettImageProcessor

    marker = folder / "ghostscript-ran"
    fake_gs = folder / "gs"
    fake_gs.write_text(f'#!/bin/sh\necho "$@" >> {marker}\n')
    fake_gs.chmod(0o755)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ['PATH']}"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\nnewpath 0 0 moveto 4 4 lineto stroke\nshowpage\n%%EOF\n"
    result = outcome(lambda: SonettImageProcessor()(eps, return_tensors="pt"))
    return f"an EPS image as bytes: {result} | Ghostscript started: {marker.exists()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=(*CASES, "all"), default="all", help="which figure to measure")
    args = parser.parse_args()
    if args.case == "all":  # each case in a fresh process, so that one case's peak memory is not another's
        for case in CASES:
            subprocess.run([sys.executable, __file__, "--case", case], check=True)
        return
    import sonett

    with tempfile.TemporaryDirectory() as folder:
        line = globals()[f"case_{args.case}"](Path(folder))
    print(f"{args.case:6s} ({Path(sonett.__file__).parent}): {line}")


if __name__ == "__main__":
    main()
