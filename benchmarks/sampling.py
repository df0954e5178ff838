"""Sampling throughput, engines side by side in one process: `hf` (model.generate) and `fast` (prefill once, fork
the KV cache, own decode loop), on the same prompts, seeds and settings.

    python benchmarks/sampling.py                                   # SmolLM2-135M-Instruct, fp32, CPU
    python benchmarks/sampling.py --batch-sizes 64,256 --prompts 64 --samples 8 --max-new-tokens 32

Reports per engine and batch size: generated tokens/s (tokens up to and including EOS; `hf` pads finished rows and
those padded steps are not counted), wall seconds, and two limits for the decode step:
- `bandwidth_limit_tokens_per_s`: rows x measured memory bandwidth / bytes a decode step must read (weights once,
  plus the KV cache of every row at the mean context length);
- `forward_limit_tokens_per_s`: rows / the measured time of one bare cached forward of one token per row (the
  model's own cost, no sampling or bookkeeping);
- `matmul_limit_tokens_per_s`: rows / the measured time of the step's matrix multiplications alone (every linear
  layer and the output head at `rows` rows, each shape timed with torch's own matmul): on a CPU without native
  bf16 the decode step is compute-bound and this is the ceiling no sampler can pass at the model's precision.
Engines alternate for --rounds rounds after a short untimed warm-up; medians are reported. JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this tree's dpokit, installed or not

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from dpokit.core.models import load_model, load_tokenizer  # noqa: E402
from dpokit.core.sampling import prompt_text, sample  # noqa: E402
from dpokit.data.generate import read_prompts  # noqa: E402


def measured_bandwidth(device: str, mib: int = 512) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def decode_step_bytes(model, rows: int, context: int) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()
    return weights + rows * context * kv


@torch.no_grad()
def matmul_seconds(model, rows: int) -> float:
    """Seconds of one decode step's matrix multiplications: each linear layer's [rows x in] @ [in x out], timed
    once per distinct shape (median of 5) and counted as often as the model has it."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    total = 0.0
    dtype = next(model.parameters()).dtype
    for (fan_in, fan_out), count in shapes.items():
        x = torch.randn(rows, fan_in, dtype=dtype)
        weight = torch.randn(fan_out, fan_in, dtype=dtype)
        torch.nn.functional.linear(x, weight)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            times.append(time.perf_counter() - t)
        total += statistics.median(times) * count
    return total


@torch.no_grad()
def bare_forward_seconds(model, tokenizer, texts: list[str], rows: int) -> float:
    """One cached single-token forward for `rows` rows after a prefill of the prompts (median of 5)."""
    enc = tokenizer([texts[i % len(texts)] for i in range(rows)], return_tensors="pt", padding=True)
    cache = DynamicCache(config=model.config)
    model(**enc, use_cache=True, cache=cache, logits_to_keep=1)
    mask = torch.cat([enc["attention_mask"], torch.ones(rows, 1, dtype=torch.long)], 1)
    token = torch.full((rows, 1), tokenizer.eos_token_id or 0)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        model(input_ids=token, attention_mask=mask, use_cache=True, cache=cache)
        times.append(time.perf_counter() - t)
        cache.crop(-1)  # back to the prompt only, for the next timing
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--engines", default="hf,fast")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per run (each sampled --samples times)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/sampling_cpu.json")
    args = ap.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype).eval()
    prompts = read_prompts(None)[: args.prompts]
    chats = [[{"role": "user", "content": p}] for p in prompts] if tokenizer.chat_template else prompts
    texts = [prompt_text(c, tokenizer) for c in chats]
    bandwidth = measured_bandwidth("cpu")
    engines = args.engines.split(",")
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for engine in engines:  # warm-up: one batch of 8 tokens per engine, untimed
            sample(model, tokenizer, chats[:max(1, batch // args.samples)], num_samples=args.samples,
                   max_new_tokens=8, batch_size=batch, engine=engine)
        for round_ in range(1, args.rounds + 1):
            for engine in engines:
                t = time.perf_counter()
                out = sample(model, tokenizer, chats, num_samples=args.samples, max_new_tokens=args.max_new_tokens,
                             temperature=1.0, seed=round_, batch_size=batch, engine=engine)
                wall = time.perf_counter() - t
                tokens = sum(len(s.response_ids) for per in out for s in per)
                runs[engine].append({"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall})
                print(f"batch {batch} {engine} round {round_}: {tokens} tokens in {wall:.1f} s", flush=True)
        prompt_len = statistics.mean(len(tokenizer(x)["input_ids"]) for x in texts)
        context = prompt_len + args.max_new_tokens / 2
        limit_bw = batch * bandwidth / decode_step_bytes(model, batch, int(context))
        limit_fw = batch / bare_forward_seconds(model, tokenizer, texts, batch)
        limit_mm = batch / matmul_seconds(model, batch)
        row = {"batch_size": batch, "engines": {}, "bandwidth_limit_tokens_per_s": limit_bw,
               "forward_limit_tokens_per_s": limit_fw, "matmul_limit_tokens_per_s": limit_mm}
        for engine, rs in runs.items():
            tps = statistics.median(r["tokens_per_s"] for r in rs)
            row["engines"][engine] = {"tokens_per_s": tps, "rounds": rs, "fraction_of_bandwidth_limit": tps / limit_bw,
                                      "fraction_of_forward_limit": tps / limit_fw,
                                      "fraction_of_matmul_limit": tps / limit_mm}
        if "hf" in runs and "fast" in runs:
            row["fast_vs_hf"] = row["engines"]["fast"]["tokens_per_s"] / row["engines"]["hf"]["tokens_per_s"]
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "engines"}), flush=True)
    report = {"model": args.model, "dtype": args.dtype, "prompts": args.prompts, "samples": args.samples,
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "memory_bandwidth_gb_s": bandwidth / 1e9,
              "torch": torch.__version__, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for row in results:
        print(f"batch {row['batch_size']}: " + ", ".join(f"{e} {v['tokens_per_s']:.0f} tok/s" for e, v in
              row["engines"].items()) + (f", fast/hf {row['fast_vs_hf']:.2f}x" if "fast_vs_hf" in row else "") +
              f"; limits: matmul {row['matmul_limit_tokens_per_s']:.0f}, forward "
              f"{row['forward_limit_tokens_per_s']:.0f}, bandwidth {row['bandwidth_limit_tokens_per_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
