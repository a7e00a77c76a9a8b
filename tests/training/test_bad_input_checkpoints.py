"""The bad-input matrix, training checkpoints: half-written, stateless, incomplete and short checkpoints,
refused by read_checkpoint, resolve_checkpoint and pretrain (docs/design.md, invariant 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sonett.training.pretraining import PretrainArguments, pretrain, read_checkpoint, resolve_checkpoint


def fake_checkpoint(root: Path, name: str, files: dict[str, bytes], listed: dict[str, int] | None) -> Path:
    """A checkpoint folder as the state file describes it (`listed`: name -> size; None: no state file)."""
    folder = root / name
    folder.mkdir(parents=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    if listed is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"step": 4, "files": listed}))
    return folder


HALF_WRITTEN = {
    "partial": (
        "step_6.partial",
        {"model.safetensors": b"x"},
        {"model.safetensors": 1},
        r"half-written checkpoint.*resume from a complete",
    ),
    "no-state": (
        "step_6",
        {"model.safetensors": b"x"},
        None,
        r"not a complete checkpoint: it has no trainer_state.json",
    ),
    "missing-file": ("step_6", {}, {"optimizer.bin": 10}, r"damaged: optimizer.bin is missing\. Resume from another"),
    "short-file": (
        "step_6",
        {"optimizer.bin": b"12345"},
        {"optimizer.bin": 10},
        r"optimizer.bin has 5 bytes, 10 were written\. Resume",
    ),
}


@pytest.mark.parametrize("case", sorted(HALF_WRITTEN))
@pytest.mark.parametrize("entry", ["read_checkpoint", "resolve_checkpoint", "pretrain"])
def test_half_written_training_checkpoints_are_refused(tmp_path, entry, case):
    name, files, listed, message = HALF_WRITTEN[case]
    root = tmp_path / "run" / "checkpoints"
    folder = fake_checkpoint(root, name, files, listed)
    with pytest.raises(ValueError, match=message):
        if entry == "read_checkpoint":
            read_checkpoint(folder)
        elif entry == "resolve_checkpoint":
            resolve_checkpoint(str(folder), root)
        else:
            pretrain(
                PretrainArguments(
                    output_dir=str(tmp_path / "run"), resume_from_checkpoint=str(folder), report_to="none", cpu=True
                )
            )
