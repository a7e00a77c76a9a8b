"""PEFT's default LoRA targets for Sonett, so that `LoraConfig(task_type="CAUSAL_LM")` without `target_modules`
adapts a Sonett model as it adapts a built-in one.

PEFT looks up the default in `peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]`
when `target_modules` is None. `modeling_sonett.py` calls `register_peft_target_modules` on import, so the entry
exists both when the `sonett` package is imported and when a saved folder is loaded as remote code. PEFT stays
optional: the import sits under `if is_peft_available()`, which the remote-code import check skips.
"""

from __future__ import annotations

from transformers.utils import is_peft_available

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Matched with re.fullmatch against each module name: the projections of every decoder mixer (any layer kind; they
# share their names, docs/design.md, "One list drives every layer") and MLP, and of the gated cross-attention
# blocks; not the vision encoder, the projector, the hourglass or the output layer. The optional prefix makes it fit
# `SonettModel` (`layers.0...`) as well as the heads that hold it as `model`.
LORA_TARGET_MODULES = (
    r"(?:.*\.)?(?:layers\.\d+\.(?:mixer|mlp)|cross_attention_blocks\.\d+\.(?:cross_attn|mlp))\."
    rf"(?:{'|'.join(PROJECTIONS)})"
)


def register_peft_target_modules(*model_types: str) -> bool:
    """Make `LORA_TARGET_MODULES` PEFT's default LoRA targets for `model_types` (an entry PEFT ships wins).

    Returns:
        Whether PEFT is installed (nothing is registered without it).
    """
    if is_peft_available():
        from peft.utils import constants

        for model_type in model_types:
            constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, LORA_TARGET_MODULES)
        return True
    return False
