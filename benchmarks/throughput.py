"""DPO training throughput, side by side in one process: trl.DPOTrainer, dpokit padded, dpokit packed (prefix
sharing), dpokit packed with a cached reference, and two compute limits.

    python benchmarks/throughput.py                                  # 16M LLaMA from config, 48 pairs, CPU fp32
    python benchmarks/throughput.py --model smollm2-135m-instruct --pairs 16
    python benchmarks/throughput.py --device cuda --dtype bf16 --attn sdpa --pairs 512

Synthetic preference set: prompt lengths log-normal (median 120 tokens, clipped 8-400), each response log-normal
(median 160, clipped 4-400), random token ids. A word-level tokenizer (one word per id) lets TRL tokenize the same
ids from text. Arms run alternately for --warmup-rounds untimed and then --rounds timed rounds; each arm trains one epoch from the same initial weights.

Limits (plain loops, no Trainer): the unique tokens of every pair (prompt once plus both responses) concatenated
and cut into rows of --limit-row-tokens, batched to the packed arm's token budget, trained as a plain causal LM
(`is_causal` attention, no masks, no padding): `limit_ref` = policy forward+backward + reference forward,
`limit_policy` = policy forward+backward only.

Prints a table and writes JSON (--out): pairs/s per arm (median over rounds and each round), ratios to TRL and to
the limits, peak memory (CPU: peak RSS growth over the arm, sampled every 5 ms after malloc_trim; CUDA: max
allocated).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this tree's dpokit, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dpokit.core.batching import PairCollator  # noqa: E402
from dpokit.core.packing import PackedPairCollator, packing_self_check, pair_length, to_device  # noqa: E402
from dpokit.train.packing import TokenBudgetBatchSampler  # noqa: E402

PAD, EOS = 0, 1


# ----------------------------------------------------------------------------------------------------------- data
def synthetic_pairs(n: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)

    def lengths(median, lo, hi):
        return np.clip(np.round(rng.lognormal(math.log(median), 0.6, n)), lo, hi).astype(int)

    prompt, chosen, rejected = lengths(120, 8, 400), lengths(160, 4, 400), lengths(160, 4, 400)
    ids = lambda k: rng.integers(2, vocab, int(k)).tolist()  # noqa: E731
    # responses end with EOS, as both dpokit and TRL add it to plain-text responses
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c - 1) + [EOS], "rejected_ids": ids(r - 1) + [EOS]}
            for p, c, r in zip(prompt, chosen, rejected)]


def word_tokenizer(vocab: int):
    """One whitespace-separated word per token id, so text round-trips to exactly the synthetic ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def as_text(ids: list[int]) -> str:
    return " ".join("<eos>" if i == EOS else f"w{i}" for i in ids)


# ---------------------------------------------------------------------------------------------------------- model
def build_model(name: str, dtype: torch.dtype, attn: str):
    if name == "llama-16m":
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(vocab_size=16384, hidden_size=256, intermediate_size=768, num_hidden_layers=10,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                             tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(dtype)
    if name == "llama-135m":  # SmolLM2-135M's architecture with random weights: same cost, no weights to carry
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, rope_theta=100000.0, pad_token_id=PAD, eos_token_id=EOS,
                             bos_token_id=None)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(dtype)
    from dpokit.core.models import load_model

    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    return load_model(name, dtype=dtype_name, attn_implementation=attn)


# --------------------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or on CPU the peak RSS growth sampled every 5 ms."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:  # hand freed heap back to the OS so one arm's leftovers do not hide the next arm's growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = self.rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())
            self.peak_mb = (self.peak - self.base) / 2**20
        return False


# ----------------------------------------------------------------------------------------------------------- arms
def training_args(opts, out_dir: str, trl_config: bool = False):
    kwargs = dict(output_dir=out_dir, per_device_train_batch_size=opts.batch_size, learning_rate=opts.lr,
                  num_train_epochs=1, bf16=opts.dtype == "bf16", fp16=False, gradient_checkpointing=opts.grad_ckpt,
                  logging_steps=10**6, save_strategy="no", report_to=[], seed=opts.seed, data_seed=opts.seed,
                  use_cpu=opts.device == "cpu", dataloader_pin_memory=False, disable_tqdm=True)
    if trl_config:
        from trl import DPOConfig

        return DPOConfig(**kwargs)
    from transformers import TrainingArguments

    return TrainingArguments(remove_unused_columns=False, **kwargs)


def run_trainer(trainer, opts) -> float:
    if opts.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    if opts.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def arm_trl(base, pairs, opts, tmp):
    from datasets import Dataset
    from trl import DPOTrainer as TRLTrainer

    tokenizer = word_tokenizer(base.config.vocab_size)
    rows = [{"prompt": as_text(p["prompt_ids"]), "chosen": " " + as_text(p["chosen_ids"]),
             "rejected": " " + as_text(p["rejected_ids"])} for p in pairs]
    model = copy.deepcopy(base)
    # TRL's default reference is the same weights loaded again by name; a model built from a config has no name,
    # so hand it the same frozen copy.
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    trainer = TRLTrainer(model=model, ref_model=ref, args=training_args(opts, tmp, trl_config=True),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] == pairs[0]["prompt_ids"] and first["chosen_ids"] == pairs[0]["chosen_ids"]
    return run_trainer(trainer, opts), {}


def dpokit_trainer(base, pairs, opts, tmp, collator, sampler=None, with_ref=True):
    from dpokit.core.config import TrainConfig
    from dpokit.train.trainer import DPOTrainer, disable_dropout

    model = copy.deepcopy(base)
    disable_dropout(model)
    ref = copy.deepcopy(base).eval().requires_grad_(False) if with_ref else None
    if ref is not None and opts.device == "cuda":
        ref.to("cuda")
    trainer = DPOTrainer(model=model, args=training_args(opts, tmp), train_dataset=pairs, data_collator=collator,
                         dpo_cfg=TrainConfig(learning_rate=opts.lr), ref_model=ref)
    trainer.token_budget_sampler = sampler
    return trainer


def arm_padded(base, pairs, opts, tmp):
    trainer = dpokit_trainer(base, pairs, opts, tmp, PairCollator(PAD))
    return run_trainer(trainer, opts), {}


def arm_packed(base, pairs, opts, tmp):
    sampler = TokenBudgetBatchSampler([pair_length(p) for p in pairs], opts.max_tokens_per_batch, seed=opts.seed)
    trainer = dpokit_trainer(base, pairs, opts, tmp, PackedPairCollator(PAD), sampler)
    return run_trainer(trainer, opts), {"batches": len(sampler)}


@torch.no_grad()
def cached_reference(base, pairs, opts) -> tuple[list[dict], float]:
    """Reference log-probs of every pair, computed once (packed batches) and attached to the pairs."""
    from dpokit.core.packing import packed_sequence_logps

    ref = copy.deepcopy(base).eval().to(opts.device)
    start = time.perf_counter()
    sampler = TokenBudgetBatchSampler([pair_length(p) for p in pairs], opts.max_tokens_per_batch, seed=opts.seed)
    out = [dict(p) for p in pairs]
    for idx in sampler:
        batch = to_device(PackedPairCollator(PAD)([pairs[i] for i in idx]), opts.device)
        with torch.autocast(opts.device, dtype=torch.bfloat16, enabled=opts.dtype == "bf16"):
            lp = packed_sequence_logps(ref, batch)
        for j, i in enumerate(idx):
            out[i]["ref_chosen_logps"] = float(lp["chosen"][j])
            out[i]["ref_rejected_logps"] = float(lp["rejected"][j])
    return out, time.perf_counter() - start


def arm_packed_cached(base, pairs, opts, tmp, cache={}):  # noqa: B006 - computed once per process
    if "pairs" not in cache:
        cache["pairs"], cache["seconds"] = cached_reference(base, pairs, opts)
    sampler = TokenBudgetBatchSampler([pair_length(p) for p in pairs], opts.max_tokens_per_batch, seed=opts.seed)
    trainer = dpokit_trainer(base, cache["pairs"], opts, tmp, PackedPairCollator(PAD), sampler, with_ref=False)
    return run_trainer(trainer, opts), {"reference_precompute_s": round(cache["seconds"], 3)}


def limit_batches(pairs, opts) -> list[torch.Tensor]:
    stream = [t for p in pairs for t in p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"]]
    width = opts.limit_row_tokens
    rows = [stream[i:i + width] for i in range(0, len(stream), width)]
    per_batch = max(1, opts.max_tokens_per_batch // width)
    batches = []
    for i in range(0, len(rows), per_batch):
        chunk = rows[i:i + per_batch]
        w = max(len(r) for r in chunk)
        # only the very last row can be short; give it its own batch so no batch is padded
        full = [r for r in chunk if len(r) == w]
        batches.append(torch.tensor(full))
        if len(full) < len(chunk):
            batches.append(torch.tensor([r for r in chunk if len(r) != w]))
    return batches


def arm_limit(base, pairs, opts, tmp, with_ref=True):
    model = copy.deepcopy(base).to(opts.device).train()
    if opts.grad_ckpt:
        model.gradient_checkpointing_enable()
    ref = copy.deepcopy(base).to(opts.device).eval().requires_grad_(False) if with_ref else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    batches = [b.to(opts.device) for b in limit_batches(pairs, opts)]
    autocast = lambda: torch.autocast(opts.device, dtype=torch.bfloat16, enabled=opts.dtype == "bf16")  # noqa: E731
    if opts.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for ids in batches:
        if ref is not None:
            with torch.no_grad(), autocast():
                ref(input_ids=ids, use_cache=False)
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if opts.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, {"batches": len(batches)}


ARMS = {
    "trl": arm_trl,
    "dpokit_padded": arm_padded,
    "dpokit_packed": arm_packed,
    "dpokit_packed_cached_ref": arm_packed_cached,
    "limit_ref": arm_limit,
    "limit_policy": lambda *a: arm_limit(*a, with_ref=False),
}


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-16m", help="llama-16m or llama-135m (SmolLM2-135M shape; built from config) or a dpokit model name/alias, "
                    "e.g. smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per batch for TRL and dpokit padded")
    ap.add_argument("--max-tokens-per-batch", type=int, default=None,
                    help="token budget of the packed arms and limits; default: batch size x mean pair tokens")
    ap.add_argument("--limit-row-tokens", type=int, default=512, help="row width of the limits' causal-LM batches")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every arm")
    ap.add_argument("--rounds", type=int, default=2, help="timed alternating rounds over all arms")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (device and cache warm-up)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/throughput.json")
    opts = ap.parse_args(argv)
    opts.dtype = opts.dtype or ("bf16" if opts.device == "cuda" else "fp32")
    return opts


def main(argv=None) -> dict:
    opts = parse_args(argv)
    arms = [a.strip() for a in opts.arms.split(",") if a.strip()]
    notes = []
    if "trl" in arms:
        try:
            import trl  # noqa: F401
        except ImportError:
            arms.remove("trl")
            notes.append("trl is not installed: TRL arm skipped")
    # Weights in fp32 with autocast for bf16 (what Trainer's bf16=True does), so every arm trains the same way.
    base = build_model(opts.model, torch.float32, opts.attn)
    if opts.model == "llama-16m" and opts.attn == "eager":
        base.config._attn_implementation = "eager"
    pairs = synthetic_pairs(opts.pairs, base.config.vocab_size, opts.seed)
    tokens = [pair_length(p) for p in pairs]
    opts.max_tokens_per_batch = opts.max_tokens_per_batch or int(opts.batch_size * statistics.mean(tokens))
    reason = packing_self_check(base, pairs[0], PAD)
    if reason is not None:
        notes.append(f"packing self-check failed for this model ({reason}); packed arms timed anyway")
    params = sum(p.numel() for p in base.parameters())
    print(f"model {opts.model} ({params / 1e6:.1f}M params), {opts.pairs} pairs, {sum(tokens)} unique tokens, "
          f"device {opts.device} {opts.dtype} {opts.attn}, batch {opts.batch_size} pairs / "
          f"{opts.max_tokens_per_batch} tokens, {torch.get_num_threads()} threads", flush=True)

    times = {a: [] for a in arms}
    memory = {a: [] for a in arms}
    extra = {}
    # Warm-up rounds are run and printed but not timed: the first use of a device, kernels and allocator caches
    # made TRL's first CUDA round 3.7x slower than its second, which would flatter every arm timed after it.
    for rnd in range(opts.warmup_rounds + opts.rounds):
        timed = rnd >= opts.warmup_rounds
        for arm in arms:
            with tempfile.TemporaryDirectory() as tmp, PeakMemory(opts.device) as mem:
                seconds, info = ARMS[arm](base, pairs, opts, tmp)
            if timed:
                times[arm].append(seconds)
            memory[arm].append(mem.peak_mb)
            extra[arm] = info
            print(f"  {'round ' + str(rnd + 1 - opts.warmup_rounds) if timed else 'warm-up':8s} {arm:26s} {seconds:8.2f} s  {opts.pairs / seconds:7.2f} pairs/s  "
                  f"peak {mem.peak_mb:8.1f} MB", flush=True)
            gc.collect()

    result = {"config": {k: v for k, v in vars(opts).items()}, "params": params, "unique_tokens": sum(tokens),
              "notes": notes, "arms": {}}
    result["config"]["device_name"] = (torch.cuda.get_device_name() if opts.device == "cuda" else "cpu")
    rate = {a: opts.pairs / statistics.median(times[a]) for a in arms}
    for arm in arms:
        row = {"pairs_per_s": round(rate[arm], 3), "pairs_per_s_each_round": [round(opts.pairs / t, 3) for t in times[arm]],
               "seconds_median": round(statistics.median(times[arm]), 3),
               "peak_memory_mb": round(max(memory[arm]), 1), **extra.get(arm, {})}
        for ref_arm in ("trl", "limit_ref", "limit_policy"):
            if ref_arm in rate and ref_arm != arm:
                row[f"ratio_to_{ref_arm}"] = round(rate[arm] / rate[ref_arm], 3)
        result["arms"][arm] = row
    result["memory_kind"] = "cuda max allocated (MB)" if opts.device == "cuda" else "peak RSS growth during the arm (MB)"

    print(f"\n{'arm':26s} {'pairs/s':>8s} {'xTRL':>6s} {'xlimit_ref':>10s} {'xlimit_pol':>10s} {'peak MB':>9s}")
    for arm, row in result["arms"].items():
        cells = [row.get(f"ratio_to_{k}", float("nan")) for k in ("trl", "limit_ref", "limit_policy")]
        print(f"{arm:26s} {row['pairs_per_s']:8.2f} {cells[0]:6.2f} {cells[1]:10.2f} {cells[2]:10.2f} "
              f"{row['peak_memory_mb']:9.1f}")
    for note in notes:
        print("note:", note)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print("wrote", opts.out)
    return result


if __name__ == "__main__":
    main()
