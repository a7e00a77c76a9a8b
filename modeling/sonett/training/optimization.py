"""The optimizer and learning-rate schedule of every hand-written training loop: AdamW with a cosine schedule.

As nanoGPT's `configure_optimizers`, the model says which of its parameters are special: a Sonett model declares the
roles of its parameters (`SonettPreTrainedModel.parameter_roles`: decayed matrices, no-decay vectors, norms and
spans, and the gates); a model that declares nothing (the Llama baseline) gets the default rule, weight decay on the
>= 2-D weights except norms. `parameter_groups` turns the roles into AdamW groups, `create_optimizer` and
`create_scheduler` build the rest with the project's settings (betas 0.9/0.95, eps 1e-8, linear warmup then cosine).

The fine-tuning recipe (`sonett.training.finetuning`) runs the transformers Trainer and keeps the Trainer's optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import get_cosine_schedule_with_warmup

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8
DECAY, NO_DECAY = "decay", "no_decay"
CROSS_ATTENTION_GATE = "cross_attention_gate"  # the tanh gates of the cross-attention blocks (start at 0)
MEMORY_GATE = "memory_gate"  # the per-head memory/local mixing gate of memory_attention layers
GATE_ROLES = (CROSS_ATTENTION_GATE, MEMORY_GATE)


def default_parameter_roles(model: torch.nn.Module) -> dict[str, str]:
    """Roles by name for a model that declares none: "decay" for >= 2-D weights whose name has no "norm", else
    "no_decay". Trainable parameters only."""
    return {
        name: DECAY if param.dim() >= 2 and "norm" not in name else NO_DECAY
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def parameter_roles(model: torch.nn.Module) -> dict[str, str]:
    """Each trainable parameter's role, by its name in `model` (a PEFT wrapper's names included).

    The roles come from the model's own `parameter_roles()` where it declares them (for a PEFT model, its base
    model's, matched by identity, so LoRA weights inside a Sonett model get Sonett's rule), else from
    `default_parameter_roles`.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    declared = getattr(base, "parameter_roles", None)
    if not callable(declared):
        return default_parameter_roles(model)
    declared_roles = declared()
    by_id = {id(param): declared_roles[name] for name, param in base.named_parameters() if name in declared_roles}
    fallback = default_parameter_roles(model)
    return {
        name: by_id.get(id(param), fallback[name]) for name, param in model.named_parameters() if param.requires_grad
    }


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    gate_lr: float | None = None,
    *,
    gate_roles: tuple[str, ...] = GATE_ROLES,
) -> list[dict]:
    """AdamW groups of the trainable parameters: [decay (at `weight_decay`), no decay] and, with `gate_lr`, a third
    group of the gates whose role is in `gate_roles`, without decay, at that learning rate (if there are any).

    Gates not given their own rate train in the no-decay group.
    """
    decay, no_decay, gates = [], [], []
    roles = parameter_roles(model)
    for name, param in model.named_parameters():
        if name not in roles:
            continue  # frozen
        role = roles[name]
        if gate_lr is not None and role in gate_roles:
            gates.append(param)
        elif role == DECAY:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": gate_lr})
    return groups


def create_optimizer(
    groups: list[dict] | Iterable[torch.nn.Parameter],
    learning_rate: float,
    *,
    betas: tuple[float, float] = ADAMW_BETAS,
    eps: float = ADAMW_EPS,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW over `groups` (from `parameter_groups`, or plain parameters decayed at `weight_decay`)."""
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)


def create_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` optimizer steps, then a cosine decay to 0 at `total_steps`."""
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)


__all__ = [
    "ADAMW_BETAS",
    "ADAMW_EPS",
    "CROSS_ATTENTION_GATE",
    "GATE_ROLES",
    "MEMORY_GATE",
    "create_optimizer",
    "create_scheduler",
    "default_parameter_roles",
    "parameter_groups",
    "parameter_roles",
]
