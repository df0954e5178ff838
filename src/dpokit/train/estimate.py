"""Will it fit, and how long will it take? Per-device peak memory and time per epoch of a training run, estimated
from the model's config, the tokenizer and the data, without loading weights (`dpokit plan`).

The numbers come from pure functions of three small records: `ModelShape` (parameter counts from a meta-device
model, layer sizes from the config), `Lengths` (the tokenized pairs' lengths) and `Target` (device, GPUs, memory,
throughput). `estimate()` adds up the parts, each in the breakdown; `suggestions()` re-runs it with one change at a
time when the run does not fit. docs/plan.md derives every formula and compares them with measured runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from dpokit.core.config import LoraConfig, RunConfig, reference_batch_size
from dpokit.core.errors import UserError
from dpokit.core.packing import _first_fit_rows, pair_length

MB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Effective training throughput assumed when not measured (FLOP/s actually achieved on dense transformer work, not
# the peak): a CPU core does a few 10 GFLOP/s in fp32 matmuls; a data-centre GPU 30-40% of its bf16 peak.
DEFAULT_FLOPS = {"cpu_per_core": 2.0e10, "cuda": 3.0e14}
# CPU only: memory a training process adds beyond the tensors counted here (Trainer and accelerate objects,
# allocator arenas, lazily imported code). Measured once on dpokit-tiny-gpt2 (configs/tiny.yaml with that model,
# `dpokit plan --measure`): 45.7 MB peak growth, of which 10.5 MB are the tensors below (docs/plan.md).
CPU_RUNTIME_MB = 35.0
# CUDA: the context torch creates on each device (kernels, cuBLAS/cuDNN handles), outside the allocator's count;
# a few hundred MB on recent drivers, more with lazy module loading off. A typical figure, not measured here.
CUDA_CONTEXT_MB = 500.0
SHARDING = ("none", "zero2", "zero3")  # zero3 = FSDP full shard


@dataclass(frozen=True)
class ModelShape:
    params: int  # every parameter once (tied embeddings counted once), from a meta-device model
    embedding_params: int  # the input embedding (no FLOPs: a lookup)
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    gated_mlp: bool  # SwiGLU-style MLP (gate, up, down) vs two matrices
    tied: bool  # lm_head shares the input embedding
    lora_params: int = 0  # trainable LoRA parameters for the configured train.lora (0: full fine-tune)
    default_lora_params: int = 0  # for a default LoRA (r=16, all-linear): what the LoRA suggestion would train
    reference_params: int | None = None  # train.reference_model when it is another model
    quantizable_params: int = 0  # weights of the linear layers bitsandbytes quantizes (all but the LM head)
    largest_linear: int = 0  # weights of the largest of them (dequantized one at a time while it computes)
    vision: VisionShape | None = None  # vision-language models: the vision tower


@dataclass(frozen=True)
class VisionShape:
    """The vision tower of a vision-language model (its projector counts with the language model)."""

    params: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    patch: int  # pixels per patch side: one tower position per patch
    frozen: bool  # train.freeze_vision: no gradients, so no activations kept and no backward through it


@dataclass(frozen=True)
class Lengths:
    """Token counts of the encoded training pairs, as training sees them (template, truncation applied)."""

    pair: list[int]  # prompt once + both responses (the packed layout)
    scored: list[int]  # response tokens that go through the LM head
    padded: list[int]  # longest of prompt+chosen, prompt+rejected (the padded layout's row width)
    vision: list[int] = field(default_factory=list)  # vision-tower positions (patches) of each pair's images, once


@dataclass(frozen=True)
class Target:
    device: str  # cpu | cuda
    gpus: int = 1
    memory_mb: float | None = None  # per device; None = unknown (fits is then None)
    flops_per_second: float = DEFAULT_FLOPS["cuda"]  # per device
    sharding: str = "none"
    process_mb: float = 0.0  # CPU: the training process before its first tensor (interpreter and libraries)


@dataclass
class Estimate:
    peak_memory_mb: float
    fits: bool | None
    memory_limit_mb: float | None
    seconds_per_epoch: float
    breakdown_mb: dict[str, float]
    time: dict[str, float]
    settings: dict[str, object]
    suggestions: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"peak_memory_mb": self.peak_memory_mb, "fits": self.fits, "memory_limit_mb": self.memory_limit_mb,
                "seconds_per_epoch": self.seconds_per_epoch, "breakdown_mb": self.breakdown_mb, "time": self.time,
                "settings": self.settings, "suggestions": self.suggestions}


def parse_memory(text: str, flag: str = "--gpu-memory") -> float:
    """'80GB', '80G', '81920MB', '80GiB' -> MiB. GB and GiB are both read as 2**30 bytes, as GPU specs mean it."""
    units = {"": 1024, "g": 1024, "gb": 1024, "gib": 1024, "m": 1, "mb": 1, "mib": 1, "t": 2**20, "tb": 2**20}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise UserError(f"{flag}: cannot read {text!r} as an amount of memory; write a number and a unit, e.g. "
                        f"{flag} 80GB or {flag} 24000MB")
    return value * units[unit]


# ---- inputs: model shape and data lengths ----------------------------------------------------------------------

def lora_param_count(model, lora_cfg: LoraConfig, skip: str | None = None) -> int:
    """Trainable LoRA parameters peft adds: r * (in + out) for each adapted linear layer. 'all-linear' adapts every
    Linear (and GPT-2 Conv1D) but the output head, as peft does; a list adapts modules whose name ends with it.
    `skip`: a module-name prefix left out (a frozen vision tower, `dpokit.train.vision.lora_targets`)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    targets = lora_cfg.target_modules
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_in, fan_out = module.in_features, module.out_features
        elif isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
        else:
            continue
        if skip and (name == skip or name.startswith(skip + ".")):
            continue
        if targets == "all-linear":
            chosen = module is not head
        else:
            names = [targets] if isinstance(targets, str) else targets
            chosen = any(name == t or name.endswith("." + t) for t in names)
        if chosen:
            total += lora_cfg.r * (fan_in + fan_out)
    return total


def quantized_bytes_per_param(quantization: str, double_quant: bool = True) -> float:
    """Bytes per quantized weight (model.quantization). 4-bit: half a byte, plus one absmax constant per block of
    64 weights, fp32 (4/64 byte a weight), or with double quantization 8-bit (1/64) plus an fp32 constant per 256
    blocks. 8-bit (LLM.int8): one byte, plus one fp32 scale per output row (a few millionths of a byte: left out)."""
    if quantization == "8bit":
        return 1.0
    if quantization == "4bit":
        return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    raise ValueError(f"not a quantization: {quantization!r}")


def linear_weights(model) -> tuple[int, int]:
    """(weights of every Linear / Conv1D layer but the output head, the largest one): what bitsandbytes quantizes
    (transformers keeps the LM head unquantized)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    sizes = [m.weight.numel() for m in model.modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    return sum(sizes), max(sizes, default=0)


def _meta_model(name_or_path: str, cfg: RunConfig, vision: bool = False):
    """The model built from its config on the meta device: exact parameter shapes, no memory, no weights read.
    `vision`: a vision-language model (`AutoModelForImageTextToText`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from dpokit.core.vision import resolve_vlm_path

    path = resolve_vlm_path(name_or_path)
    try:  # a hub id downloads config.json only
        config = AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"model.name_or_path: cannot read the config of {name_or_path!r} ({first[:200]}); give a "
                        "local folder, a hub id reachable from here, or a dpokit alias") from None
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    with init_empty_weights():
        model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    model.tie_weights()  # from_config under init_empty_weights leaves tied heads untied (transformers 5)
    return model, config


def vision_shape(model, config, frozen: bool) -> tuple[VisionShape, str]:
    """The vision tower's size and layer dimensions (from the model's `vision_config`), and its module name."""
    from dpokit.core.vision import vision_tower

    tower = vision_tower(model)
    name = next(n for n, m in model.named_modules() if m is tower)
    v = config.vision_config
    shape = VisionShape(params=sum(p.numel() for p in tower.parameters()), hidden=v.hidden_size,
                        layers=v.num_hidden_layers, intermediate=getattr(v, "intermediate_size", 4 * v.hidden_size),
                        heads=v.num_attention_heads, patch=v.patch_size, frozen=frozen)
    return shape, name


def model_shape(cfg: RunConfig, vision: bool = False) -> ModelShape:
    """The policy's shape from its config (`vision`: a vision-language model, with its tower)."""
    model, config = _meta_model(cfg.model.name_or_path, cfg, vision)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # configs map these standard names onto their own (GPT-2: n_embd, n_layer, n_head) through attribute_map
    hidden, layers, heads = text.hidden_size, text.num_hidden_layers, text.num_attention_heads
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    quantizable, largest = linear_weights(model)
    tower, skip = vision_shape(model, config, cfg.train.freeze_vision) if vision else (None, None)
    reference_params = None
    if cfg.train.reference_model:
        ref, _ = _meta_model(cfg.train.reference_model, cfg)
        reference_params = sum(p.numel() for p in ref.parameters())
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()), embedding_params=embed.weight.numel(),
        vocab=embed.weight.shape[0], hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
        gated_mlp=any(n.endswith("gate_proj") for n, _ in model.named_modules()), tied=tied,
        lora_params=lora_param_count(model, cfg.train.lora, skip if cfg.train.freeze_vision else None)
        if cfg.train.lora else 0,
        default_lora_params=lora_param_count(model, LoraConfig(), skip if cfg.train.freeze_vision else None),
        reference_params=reference_params, quantizable_params=quantizable, largest_linear=largest, vision=tower)


def data_lengths(cfg: RunConfig, vision: VisionShape | None = None) -> Lengths:
    """Tokenize the training pairs exactly as training does (dpokit.data.prepare.prepare_data; image pairs through
    the model's processor, `dpokit.train.vision.prepare_vision_data`, image tokens expanded): same template,
    truncation and split, so the lengths are the ones the batches will have."""
    if vision is not None:
        from dpokit.train.vision import prepare_vision_data

        train_enc = prepare_vision_data(cfg).train_enc
    else:
        from dpokit.core.models import load_tokenizer
        from dpokit.data.prepare import prepare_data

        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, revision=cfg.model.revision,
                                   trust_remote_code=cfg.model.trust_remote_code)
        _, train_enc, _ = prepare_data(cfg, tokenizer)
    pair, scored, padded = [], [], []
    for p in train_enc:
        # pairs hold chosen_ids/rejected_ids; ranked and unpaired rows a list of responses_ids
        responses = p["responses_ids"] if "responses_ids" in p else [p["chosen_ids"], p["rejected_ids"]]
        pair.append(pair_length(p))
        scored.append(sum(len(r) for r in responses) - (0 if p["prompt_ids"] else 1))
        padded.append(len(p["prompt_ids"]) + max(len(r) for r in responses))
    # The tower sees each image's pixels as patches: pixel values (..., 3, H, W) hold 3 * patch^2 values per patch.
    patches = [int(p["pixel_values"].numel()) // (3 * vision.patch ** 2) for p in train_enc] if vision else []
    return Lengths(pair=pair, scored=scored, padded=padded, vision=patches)


# ---- the estimate ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    rows: int
    width: int
    scored: int  # tokens through the LM head
    pairs: int
    vision: int = 0  # vision-tower positions of the batch's images (each pair's images once)


def batches(cfg: RunConfig, lengths: Lengths) -> list[Batch]:
    """The epoch's batches in the layout training builds: batch_size pairs in a seeded shuffle (or token-budget
    batches of pairs grouped by length), packed first-fit into rows as wide as the batch's longest pair, or padded
    to 2 rows per pair."""
    t = cfg.train
    n = len(lengths.pair)
    if t.packed and t.max_tokens_per_batch:
        order = sorted(range(n), key=lambda i: lengths.pair[i])
        groups, current, used = [], [], 0
        for i in order:  # the same greedy grouping as dpokit.train.packing.TokenBudgetBatchSampler
            if current and used + lengths.pair[i] > t.max_tokens_per_batch:
                groups.append(current)
                current, used = [], 0
            current.append(i)
            used += lengths.pair[i]
        groups.append(current)
    else:
        order = list(range(n))
        random.Random(t.seed).shuffle(order)
        groups = [order[i:i + t.batch_size] for i in range(0, n, t.batch_size)]
    out = []
    for g in groups:
        scored = sum(lengths.scored[i] for i in g)
        patches = sum(lengths.vision[i] for i in g) if lengths.vision else 0
        if t.packed:
            width = max(lengths.pair[i] for i in g)
            out.append(Batch(len(_first_fit_rows([lengths.pair[i] for i in g], width)), width, scored, len(g),
                             patches))
        else:  # the padded layout encodes each image twice (chosen row and rejected row)
            out.append(Batch(2 * len(g), max(lengths.padded[i] for i in g), scored, len(g), 2 * patches))
    return out


def _dtypes(cfg: RunConfig, target: Target) -> tuple[int, int, bool]:
    """(weight bytes, activation bytes, autocast from fp32 weights) as `dpokit train` resolves them there."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if target.device == "cuda" else "float32"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if target.device == "cuda" else "fp32"
    weight = DTYPE_BYTES[dtype]
    autocast = weight == 4 and precision in ("bf16", "fp16")
    return weight, 2 if autocast else weight, autocast


def weight_bytes(cfg: RunConfig, shape: ModelShape, w: int) -> float:
    """The base model's weights: `w` bytes each, or with model.quantization the linear layers' quantized bytes (and
    their constants) plus the rest (embeddings, LM head, norms) in the weights dtype."""
    q = cfg.model.quantization
    if q == "none":
        return float(shape.params * w)
    per = quantized_bytes_per_param(q, cfg.model.double_quant)
    return (shape.params - shape.quantizable_params) * w + shape.quantizable_params * per


def activation_bytes(shape: ModelShape, b: Batch, act: int, checkpointing: bool, eager: bool) -> float:
    """Tensors autograd keeps for the backward pass of one batch (the LM head's logits apart).

    Per token and layer (LLaMA-style decoder, counted from the layer's code): the two RMSNorms keep their input and
    output (4h); attention keeps q, k and v (k and v repeated to all heads, 3h), its output and the o_proj input
    (2h) and one more h of layout copies: 10h; a gated MLP keeps gate, its activation, up and their product (4i),
    a plain MLP 2i; plus the softmax statistics (one per head) and the attention mask as a float (one per key).
    Eager attention also keeps the attention probabilities (heads x keys). Per token once: the final norm and the
    head's input (3h). Gradient checkpointing keeps each layer's input (h) and one layer's full set."""
    h, i = shape.hidden, shape.intermediate
    per_token_layer = 10 * h + (4 if shape.gated_mlp else 2) * i + shape.heads + b.width * (1 + eager * shape.heads)
    tokens = b.rows * b.width
    if checkpointing:
        return act * tokens * (shape.layers * h + per_token_layer + 3 * h)
    return act * tokens * (shape.layers * per_token_layer + 3 * h)


def vision_activation_bytes(vision: VisionShape | None, b: Batch, act: int) -> float:
    """A trained vision tower's saved tensors, per patch and layer as a text layer's (ViT: plain MLP, no mask).
    A frozen tower keeps none: nothing before it needs a gradient."""
    if vision is None or vision.frozen:
        return 0.0
    return act * b.vision * vision.layers * (10 * vision.hidden + 2 * vision.intermediate + vision.heads)


def logits_bytes(shape: ModelShape, scored: int, act: int, backward: bool) -> float:
    """The LM head over the scored tokens: its output, an fp32 copy for log-softmax when the output is half
    precision, and in the backward pass the gradient of the logits and softmax's exp (fp32 each)."""
    per = act + (4 if act != 4 else 0) + (8 if backward else 0)
    return float(scored) * shape.vocab * per


def estimate(cfg: RunConfig, shape: ModelShape, lengths: Lengths, target: Target,
             reference: str, batch_list: list[Batch] | None = None) -> Estimate:
    """Peak memory per device and time per epoch. `reference`: the strategy the run uses (plan.reference)."""
    t = cfg.train
    w, act, autocast = _dtypes(cfg, target)
    all_batches = batch_list if batch_list is not None else batches(cfg, lengths)
    if not all_batches:
        raise UserError("data: no training pairs to plan for; check data.source and data.max_rows")
    lora = t.lora is not None
    frozen_tower = shape.vision.params if shape.vision and shape.vision.frozen else 0
    trainable = shape.lora_params if lora else shape.params - frozen_tower
    train_w = 4 if lora else w  # peft keeps adapter weights in fp32 whatever the base dtype
    n = target.gpus
    shard_states = n if target.sharding in ("zero2", "zero3") else 1
    shard_weights = n if target.sharding == "zero3" else 1

    base_weights = weight_bytes(cfg, shape, w)
    parts: dict[str, float] = {
        "weights": base_weights / shard_weights + (shape.lora_params * 4 if lora else 0),
        "gradients": trainable * train_w / shard_states,
        "optimizer": 2 * trainable * train_w / shard_states,  # AdamW: exp_avg and exp_avg_sq, in the param dtype
    }
    quantized = cfg.model.quantization != "none"
    if autocast:  # bitsandbytes dequantizes its weights itself: autocast copies only the others
        parts["autocast_weight_copies"] = (shape.params - quantized * shape.quantizable_params) * 2 / shard_weights
    if quantized:  # one layer's weight dequantized to the compute dtype while it computes
        parts["dequantized_layer"] = shape.largest_linear * act
    if reference == "model":
        parts["reference_model"] = (shape.reference_params or shape.params) * w
    eager = cfg.model.attn_implementation == "eager"
    worst = max(all_batches, key=lambda b: (activation_bytes(shape, b, act, t.gradient_checkpointing, eager)
                                            + vision_activation_bytes(shape.vision, b, act)
                                            + logits_bytes(shape, b.scored, act, True)))
    parts["activations"] = activation_bytes(shape, worst, act, t.gradient_checkpointing, eager)
    if shape.vision is not None and not shape.vision.frozen:
        parts["vision_activations"] = vision_activation_bytes(shape.vision, worst, act)
    head = logits_bytes(shape, worst.scored, act, True)
    if reference in ("model", "adapter"):  # the reference forward runs while the policy's activations are held
        head = max(head, logits_bytes(shape, worst.scored, act, False) * 2)
    parts["logits"] = head
    if target.device == "cpu":
        parts["runtime"] = CPU_RUNTIME_MB * MB
        parts["process"] = target.process_mb * MB  # the interpreter and libraries: the host is the device
    else:
        parts["cuda_context"] = CUDA_CONTEXT_MB * MB
    peak = sum(parts.values())
    if reference == "precomputed":  # an earlier phase: the reference forward over every pair, no gradients
        pre = base_weights + logits_bytes(shape, worst.scored * reference_batch_size(cfg) / max(worst.pairs, 1),
                                              act, False)
        fixed = parts.get("runtime", 0.0) + parts.get("process", 0.0) + parts.get("cuda_context", 0.0)
        peak = max(peak, pre + fixed)
    breakdown = {k: round(v / MB, 1) for k, v in parts.items()}
    limit = target.memory_mb
    peak_mb = round(peak / MB, 1)
    fits = None if limit is None else peak_mb <= limit
    time = time_per_epoch(cfg, shape, lengths, target, reference, all_batches)
    settings = {"device": target.device, "gpus": n, "sharding": target.sharding,
                "weights_dtype_bytes": w, "activation_dtype_bytes": act, "quantization": cfg.model.quantization, "trainable_params": trainable,
                "params": shape.params, "lora": lora, "reference": reference,
                "gradient_checkpointing": t.gradient_checkpointing, "packing": t.packed,
                "batch_size": t.batch_size, "max_tokens_per_batch": t.max_tokens_per_batch,
                "pairs": len(lengths.pair), "largest_batch": {"rows": worst.rows, "width": worst.width,
                                                              "pairs": worst.pairs, "scored_tokens": worst.scored}}
    if shape.vision is not None:
        settings.update(vision_params=shape.vision.params, freeze_vision=shape.vision.frozen,
                        vision_patches_per_epoch=sum(b.vision for b in all_batches))
        settings["largest_batch"]["vision_patches"] = worst.vision
    return Estimate(peak_memory_mb=peak_mb, fits=fits, memory_limit_mb=limit,
                    seconds_per_epoch=time["seconds_per_epoch"], breakdown_mb=breakdown, time=time,
                    settings=settings)


def time_per_epoch(cfg: RunConfig, shape: ModelShape, lengths: Lengths, target: Target, reference: str,
                   all_batches: list[Batch]) -> dict[str, float]:
    """FLOPs on the epoch's unique tokens / throughput. A forward is 2 FLOPs per weight per token (the body on every
    token, the LM head on scored tokens only); training adds a backward of 4 (LoRA: 2 for the input gradients of the
    frozen weights, plus 6 per adapter weight); gradient checkpointing one more forward; a reference forward 2."""
    t = cfg.train
    tower = shape.vision.params if shape.vision else 0
    body = shape.params - tower - shape.embedding_params - (0 if shape.tied else shape.vocab * shape.hidden)
    head = shape.vocab * shape.hidden
    tokens = sum(b.rows * b.width for b in all_batches) if not t.packed else sum(lengths.pair)
    scored = sum(lengths.scored)
    forward = 2 * body * tokens + 2 * head * scored
    if t.lora:
        train = forward * (2 + t.gradient_checkpointing) + 6 * shape.lora_params * tokens
    else:
        train = forward * (3 + t.gradient_checkpointing)
    if shape.vision is not None:  # the tower on every patch: a forward, and when trained its backward too
        patches = sum(b.vision for b in all_batches)
        vision_forward = 2 * tower * patches
        forward += vision_forward
        train += vision_forward * (1 if shape.vision.frozen else 3 + t.gradient_checkpointing)
    ref = forward if reference in ("model", "adapter") else 0.0
    flops = train + ref
    seconds = flops / (target.flops_per_second * target.gpus)
    out = {"seconds_per_epoch": float(f"{seconds:.4g}"), "flops_per_epoch": float(flops), "tokens_per_epoch": tokens,
           "scored_tokens_per_epoch": scored, "flops_per_second_per_device": target.flops_per_second,
           "steps_per_epoch": -(-len(all_batches) // (t.grad_accum * target.gpus))}
    if reference == "precomputed":
        out["precompute_seconds"] = float(f"{forward / (target.flops_per_second * target.gpus):.4g}")
    return out


# ---- what to change --------------------------------------------------------------------------------------------

def _qlora_options(cfg: RunConfig, shape: ModelShape, target: Target, reference: str) -> list[tuple]:
    """The 4-bit base (QLoRA) suggestion: LoRA on NF4 weights, the reference the adapter-disabled base (a copy of
    a quantized base is refused, dpokit.train.plan). For a full fine-tune it comes with the default LoRA."""
    t = cfg.train
    if cfg.model.quantization != "none":
        return []
    change = "--set model.quantization=4bit (4-bit base (QLoRA): NF4 weights, ~0.5 byte per parameter"
    if t.lora is None:
        change = "--set train.lora.r=16 " + change + ", LoRA all-linear"
        shape = replace(shape, lora_params=shape.default_lora_params)
    ref = "adapter" if reference == "model" and not t.reference_model else reference
    update = {"train": t.model_copy(update={"lora": t.lora or LoraConfig()}),
              "model": cfg.model.model_copy(update={"quantization": "4bit"})}
    return [(change + "; pip install 'dpokit[quant]')", cfg.model_copy(update=update), target, shape, ref)]


def suggestions(cfg: RunConfig, shape: ModelShape, lengths: Lengths, target: Target, reference: str,
                base: Estimate) -> list[dict]:
    """Each change that could make the run fit, with the peak it gives (the estimate re-run with that change)."""
    options: list[tuple[str, RunConfig, Target, ModelShape, str]] = []
    t = cfg.train
    if t.lora is None:
        lora_shape = replace(shape, lora_params=shape.default_lora_params)
        lora_cfg = cfg.model_copy(update={"train": t.model_copy(update={"lora": LoraConfig()})})
        ref = "adapter" if reference == "model" and not t.reference_model else reference
        options.append(("--set train.lora.r=16 (LoRA, all-linear; reference: the base under the disabled adapter)",
                        lora_cfg, target, lora_shape, ref))
    options += _qlora_options(cfg, shape, target, reference)
    if reference in ("model", "adapter"):
        options.append(("--set train.reference=precomputed (reference log-probs once, before training)",
                        cfg, target, shape, "precomputed"))
    if not t.gradient_checkpointing:
        options.append(("--set train.gradient_checkpointing=true",
                        cfg.model_copy(update={"train": t.model_copy(update={"gradient_checkpointing": True})}),
                        target, shape, reference))
    worst_tokens = base.settings["largest_batch"]["rows"] * base.settings["largest_batch"]["width"]
    budget = max(worst_tokens // 2, max(lengths.pair))
    if t.packed and budget < worst_tokens:
        options.append((f"--set train.max_tokens_per_batch={budget} (smaller batches; raise train.grad_accum to "
                        "keep the step size)",
                        cfg.model_copy(update={"train": t.model_copy(update={"max_tokens_per_batch": budget})}),
                        target, shape, reference))
    if target.device == "cuda" and cfg.model.quantization == "none":  # bitsandbytes' weights do not shard
        gpus = max(2, target.gpus * 2)
        options.append((f"--gpus {gpus} with ZeRO-3 / FSDP full shard (accelerate launch --config_file "
                        "configs/accelerate/fsdp.yaml)", cfg, replace(target, gpus=gpus, sharding="zero3"), shape,
                        reference))
    out = []
    for change, c, tg, sh, ref in options:
        est = estimate(c, sh, lengths, tg, ref)
        out.append({"change": change, "peak_memory_mb": est.peak_memory_mb, "fits": est.fits,
                    "saves_mb": round(base.peak_memory_mb - est.peak_memory_mb, 1)})
    return sorted(out, key=lambda s: s["peak_memory_mb"])
