"""The transformers model behind wrapper chains: DDP and FSDP1 (`.module`), DeepSpeed's engine (`.module`; its own
`.config` is a dict), PEFT (`get_base_model()`), torch.compile (`._orig_mod`).

Training code receives the wrapped model (Trainer passes `model_wrapped` to compute_loss); what dpokit reads from
the model (its `PretrainedConfig`, its output layer, its decoder) must be found behind the wrappers, while the
forward itself still goes through them (DDP's gradient hooks, accelerate's autocast)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

MAX_DEPTH = 8  # wrappers seen in practice: DeepSpeed/DDP -> PEFT -> LoraModel -> the transformers model


def transformers_model(model) -> torch.nn.Module | None:
    """The innermost module of `model`'s wrapper chain whose `.config` is a `PretrainedConfig` (the transformers
    model), or None when there is none."""
    obj = model
    for _ in range(MAX_DEPTH):
        if hasattr(obj, "get_base_model"):  # PEFT: PeftModel forwards .config, but the base is the real holder
            obj = obj.get_base_model()
            continue
        if isinstance(getattr(obj, "config", None), PretrainedConfig):
            return obj
        inner = getattr(obj, "module", None)  # DDP, FSDP1, DeepSpeed engine
        if inner is None:
            inner = getattr(obj, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, torch.nn.Module):
            return None
        obj = inner
    return None


def model_config(model) -> PretrainedConfig | None:
    """The `PretrainedConfig` behind `model`'s wrappers, or None."""
    inner = transformers_model(model)
    return None if inner is None else inner.config
