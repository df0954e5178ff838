"""A quantized base model (model.quantization: 4bit | 8bit) through bitsandbytes and transformers'
BitsAndBytesConfig: the loading options, the optional dependency's checks, and the preparation for LoRA training
(peft's prepare_model_for_kbit_training, keeping the non-quantized weights in their dtype). docs/qlora.md.

bitsandbytes is an optional extra (`pip install 'dpokit[quant]'`); it is imported only when a config asks for
quantization (its import takes seconds).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from dpokit.core.errors import UserError

BNB_MIN_VERSION = (0, 45)
INSTALL_HINT = "pip install 'dpokit[quant]' (or pip install 'bitsandbytes>=0.45')"


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be used here (missing, too old), as the fix; None when it can. Imports nothing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"bitsandbytes is not installed; install it with: {INSTALL_HINT}"
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < BNB_MIN_VERSION:
        return f"bitsandbytes {version} is too old (4-bit on CPU needs >= 0.45); upgrade with: {INSTALL_HINT}"
    return None


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype quantized layers compute in: train.precision's (auto: bf16 on a GPU that supports it, else fp32)."""
    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def bnb_config(model_cfg, precision: str = "auto"):
    """transformers' BitsAndBytesConfig for `model_cfg` (a ModelConfig), or None for model.quantization: none."""
    if model_cfg.quantization == "none":
        return None
    problem = bitsandbytes_problem()
    if problem:
        raise UserError(f"model.quantization: {model_cfg.quantization} needs bitsandbytes: {problem}")
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quant_type,
                              bnb_4bit_use_double_quant=model_cfg.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(precision))


def describe(model_cfg) -> str:
    """One phrase naming the quantization, for reports and model cards: '4-bit nf4, double quantization'."""
    if model_cfg.quantization == "none":
        return "none (base weights in model.dtype)"
    if model_cfg.quantization == "8bit":
        return "8-bit (bitsandbytes LLM.int8)"
    return (f"4-bit {model_cfg.quant_type} (bitsandbytes"
            + (", double quantization)" if model_cfg.double_quant else ")"))


def quantized_linear_count(model) -> int:
    """Linear layers bitsandbytes holds quantized (Linear4bit / Linear8bitLt)."""
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def is_quantized(model) -> bool:
    """A model loaded with a quantization_config (transformers sets is_quantized), peft-wrapped or not."""
    base = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(base, "is_quantized", False))


def prepare_for_kbit_training(model, name: str):
    """peft's prepare_model_for_kbit_training, the parts training needs: every base weight frozen, layer norms in
    fp32 (their statistics in half precision lose the small updates), and gradients on the input embeddings' output
    so they reach the LoRA weights through (reentrant) gradient checkpointing. Unlike peft, the other non-quantized
    weights (embeddings, LM head) stay in their dtype: peft's fp32 copy of them would double their memory.

    Raises UserError when bitsandbytes quantized no layer of this model type (nothing would be saved)."""
    if quantized_linear_count(model) == 0:
        raise UserError(f"model.quantization: bitsandbytes quantized no layer of {name!r} "
                        f"({type(model).__name__}); use model.quantization: none for this model type")
    model.requires_grad_(False)
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.to(torch.float32)
    model.enable_input_require_grads()
    return model
