"""Mutation check: do the fast tests catch deliberate bugs in the training core?

Each mutation is one exact string replacement in one source file (it must occur exactly once). The check copies the
repository (without .git and build caches) into a temporary folder, verifies that the selected fast tests pass there
unmutated, then for each mutation: applies it to the copy, runs its fast tests (`-m 'not slow'`, fixed order, with a
timeout), and restores the file (always, in `finally`). The working tree is never modified, so it is safe while
others run tests in it. A mutation is *killed* when its tests fail (or time out).

    OMP_NUM_THREADS=1 python benchmarks/mutation_check.py                 # all mutations, JSON summary on stdout
    python benchmarks/mutation_check.py --list                            # the mutations, one a line
    python benchmarks/mutation_check.py --only lora_reference_not_disabled ties_counted_accurate

Not collected by pytest (benchmarks/ is outside testpaths). Exit code 0 whatever the kill rate; 2 when the baseline
fails or a mutation no longer applies (the source changed: update its `old` string).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = "src/dpokit/train/losses.py"
TRAIN_PACKING = "src/dpokit/train/packing.py"
CORE_PACKING = "src/dpokit/core/packing.py"
REFERENCE = "src/dpokit/train/reference.py"
TRAINER = "src/dpokit/train/trainer.py"
MODELS = "src/dpokit/core/models.py"

REPRO = "tests/test_reproducibility.py"
LOSS_TESTS = ("tests/test_losses.py",)
PACKING_TESTS = ("tests/test_packing.py",)
REFERENCE_TESTS = ("tests/test_reference_cache.py", f"{REPRO}::test_lora_reference_is_the_base_model")


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTATIONS = [
    # --- the four bugs issue 21's audit named, and the seeding this issue added -------------------------------------
    Mutation("lora_reference_not_disabled", TRAINER,
             "with self.accelerator.unwrap_model(model).disable_adapter():", "with torch.no_grad():",
             (f"{REPRO}::test_lora_reference_is_the_base_model",),
             "LoRA reference follows the policy (adapter not switched off)"),
    Mutation("rng_state_not_restored", TRAINER,
             "    def reference_logps(self, model, batch)",
             "    def _load_rng_state(self, checkpoint):\n        return None\n\n"
             "    def reference_logps(self, model, batch)",
             (f"{REPRO}::test_resume_with_dropout_equals_straight_run",),
             "resume skips restoring the checkpoint's RNG state"),
    Mutation("ties_counted_accurate", TRAINER, "(chosen_r > rejected_r).float()", "(chosen_r >= rejected_r).float()",
             (f"{REPRO}::test_tied_rewards_are_not_accurate",), "rewards/accuracies counts tied rewards as correct"),
    Mutation("data_position_skipped", TRAINER, "remove_unused_columns=False,",
             "remove_unused_columns=False, ignore_data_skip=True,",
             (f"{REPRO}::test_resume_continues_at_the_data_position",),
             "resume restarts the epoch's data from its first batch"),
    Mutation("setup_not_seeded", TRAINER, "    set_seed(cfg.train.seed)\n", "",
             (f"{REPRO}::test_two_identical_lora_runs_in_one_process_are_identical",),
             "LoRA's initial weights drawn before anything seeds torch (the bug issue 21 found)"),
    Mutation("tiny_build_reseeds_global_rng", MODELS,
             "    with torch.random.fork_rng(devices=[]), quiet_hf():\n        torch.default_generator.manual_seed(0)\n",
             "    torch.manual_seed(0)\n    with quiet_hf():\n",
             (f"{REPRO}::test_two_identical_lora_runs_in_one_process_are_identical",),
             "building a tiny model resets the caller's RNG (first run in a fresh cache differs)"),
    # --- losses -----------------------------------------------------------------------------------------------------
    Mutation("cdpo_smoothing_sign", LOSSES, "return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)",
             "return -(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)", LOSS_TESTS, "cDPO label-smoothing sign"),
    Mutation("sigmoid_beta_dropped", LOSSES, "    h = cfg.beta * (chosen_lr - rejected_lr)\n    eps = cfg.label_smoothing\n"
             "    return -(1 - eps)", "    h = (chosen_lr - rejected_lr)\n    eps = cfg.label_smoothing\n    return -(1 - eps)",
             LOSS_TESTS, "DPO without beta"),
    Mutation("ipo_lengths_swapped", LOSSES, "chosen_lr / n_w - rejected_lr / n_l", "chosen_lr / n_l - rejected_lr / n_w",
             LOSS_TESTS, "IPO normalises each log-ratio by the other response's length"),
    Mutation("hinge_without_relu", LOSSES, "return torch.relu(1 - cfg.beta * (chosen_lr - rejected_lr))",
             "return 1 - cfg.beta * (chosen_lr - rejected_lr)", LOSS_TESTS, "hinge loss not clipped at 0"),
    Mutation("robust_denominator", LOSSES, "/ (1 - 2 * eps)", "/ (1 - eps)", LOSS_TESTS, "robust DPO's de-biasing"),
    Mutation("simpo_gamma_sign", LOSSES, "- cfg.simpo_gamma)", "+ cfg.simpo_gamma)", LOSS_TESTS, "SimPO margin sign"),
    Mutation("orpo_odds_swapped", LOSSES,
             "(torch.log1p(-torch.exp(mean_w)) - torch.log1p(-torch.exp(mean_l)))",
             "(torch.log1p(-torch.exp(mean_l)) - torch.log1p(-torch.exp(mean_w)))", LOSS_TESTS, "ORPO log-odds"),
    Mutation("sft_normalised_by_rejected", LOSSES, "lp.chosen_tokens.sum().clamp(min=1)",
             "lp.rejected_tokens.sum().clamp(min=1)", LOSS_TESTS, "SFT term divides by the rejected token count"),
    Mutation("combined_keeps_last_term", LOSSES, "total = value if total is None else total + value", "total = value",
             LOSS_TESTS, "combined loss drops all but the last term"),
    Mutation("zero_weight_accepted", LOSSES, "if not weight > 0:", "if weight < 0:", LOSS_TESTS,
             "a loss weight of 0 is accepted"),
    # --- training batches (train/packing.py) ------------------------------------------------------------------------
    Mutation("budget_epoch_order_fixed", TRAIN_PACKING, 'random.Random(f"{self.seed}-{self.epoch}")',
             "random.Random(self.seed)", PACKING_TESTS + (f"{REPRO}::test_resume_continues_at_the_data_position",),
             "token-budget batches visited in the same order every epoch"),
    Mutation("budget_overflows", TRAIN_PACKING, "used + lengths[i] > max_tokens", "used > max_tokens",
             PACKING_TESTS, "token-budget batches may exceed the budget"),
    Mutation("budget_pairs_counted_as_batches", TRAIN_PACKING, "return sum(batch_num_pairs(b) for b in batch_samples)",
             "return len(batch_samples)", PACKING_TESTS + (f"{REPRO}::test_resume_continues_at_the_data_position",),
             "token-budget loss normalised per micro-batch instead of per pair"),
    # --- packed layout (core/packing.py) ----------------------------------------------------------------------------
    Mutation("rejected_sees_chosen", CORE_PACKING, "block[lp + lc:, lp:lp + lc] = False",
             "block[lp + lc:, lp:lp + lc] = True", PACKING_TESTS, "rejected tokens attend to the chosen response"),
    Mutation("rejected_positions_continue", CORE_PACKING, "torch.arange(lp, lp + lr)",
             "torch.arange(lp + lc, lp + lc + lr)", PACKING_TESTS, "rejected positions continue after chosen"),
    Mutation("first_rejected_from_last_chosen", CORE_PACKING, "                    src = lp - 1\n",
             "                    src = lp + lc - 1\n", PACKING_TESTS,
             "first rejected token predicted from the last chosen token"),
    Mutation("rejected_summed_into_chosen", CORE_PACKING, "s_slot.append(n_pairs + i)", "s_slot.append(i)",
             PACKING_TESTS, "rejected log-probs added to the chosen slot"),
    Mutation("eager_mask_inverted", CORE_PACKING, "masked_fill_(~allowed, torch.finfo(dtype).min)",
             "masked_fill_(allowed, torch.finfo(dtype).min)", PACKING_TESTS, "additive (eager) mask inverted"),
    # --- precomputed reference (train/reference.py) -----------------------------------------------------------------
    Mutation("ref_values_swapped", REFERENCE,
             'pair["ref_chosen_logps"], pair["ref_rejected_logps"] = chosen, rejected',
             'pair["ref_chosen_logps"], pair["ref_rejected_logps"] = rejected, chosen', REFERENCE_TESTS,
             "precomputed chosen/rejected reference log-probs swapped"),
    Mutation("cache_key_ignores_max_length", REFERENCE, '"max_length": max_length}', '"max_length": 0}',
             REFERENCE_TESTS, "reference cache key ignores max_length"),
    Mutation("cache_key_ignores_template", REFERENCE, '"template": template or ""', '"template": ""',
             REFERENCE_TESTS, "reference cache key ignores the chat template"),
    Mutation("fingerprint_ignores_rejected", REFERENCE, 'h.update(json.dumps([p["prompt_ids"], p["chosen_ids"], '
             'p["rejected_ids"]]).encode())', 'h.update(json.dumps([p["prompt_ids"], p["chosen_ids"]]).encode())',
             REFERENCE_TESTS, "data fingerprint ignores the rejected responses"),
    Mutation("refresh_ignored", REFERENCE, "if path.is_file() and not refresh:", "if path.is_file():",
             REFERENCE_TESTS, "refresh_reference still reads the cache"),
    Mutation("shards_gathered_in_blocks", REFERENCE, "values[r::world] = part",
             "values[r * len(part):(r + 1) * len(part)] = part", REFERENCE_TESTS,
             "multi-process precompute reassembles shards in the wrong order"),
    # --- written after the tests above were strengthened, with no test added for them (an unbiased sample) ---------
    Mutation("budget_set_epoch_ignored", TRAIN_PACKING, "        self.epoch = epoch\n", "        self.epoch = 0\n",
             PACKING_TESTS, "token-budget sampler ignores the epoch"),
    Mutation("reference_self_check_skipped", TRAIN_PACKING, '("reference", ref_model)', '("reference", None)',
             PACKING_TESTS, "packing self-check skipped for a separate reference model"),
    Mutation("packing_false_ignored", TRAIN_PACKING, "    if not train_cfg.packed:\n", "    if False:\n",
             PACKING_TESTS + (f"{REPRO}::test_lora_reference_is_the_base_model",),
             "train.layout: padded still packs"),
    Mutation("self_check_tolerance_lost", CORE_PACKING, "tol = 1e-4 if _model_dtype(model) == torch.float32 else 3e-2",
             "tol = 1e3", PACKING_TESTS, "packing self-check accepts any disagreement"),
    Mutation("stale_cache_length_unchecked", REFERENCE,
             'if len(stored["train"]) != len(train_pairs) or len(stored["eval"]) != len(eval_pairs):', "if False:",
             REFERENCE_TESTS, "a cached file with another pair count is used"),
    Mutation("ipo_paper_target", LOSSES, "return (chosen_lr - rejected_lr - 1 / (2 * cfg.beta)) ** 2",
             "return (chosen_lr - rejected_lr - 1 / cfg.beta) ** 2", LOSS_TESTS, "unnormalised IPO's target margin"),
    Mutation("duplicate_loss_accepted", LOSSES, "if len({n for n, _ in out}) != len(out):", "if False:", LOSS_TESTS,
             "a loss listed twice is accepted"),
]
UNTARGETED = {"budget_set_epoch_ignored", "reference_self_check_skipped", "packing_false_ignored",
              "self_check_tolerance_lost", "stale_cache_length_unchecked", "ipo_paper_target", "duplicate_loss_accepted"}


def copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                                    ".import_linter_cache", "runs", ".venv", "build", "dist")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(repo / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("DPOKIT_TEST_CACHE", None)  # a mutation must not poison a cache other runs reuse
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", "-m", "not slow",
           *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "timed_out": True, "seconds": round(time.time() - start, 1), "failed": []}
    failed = [line.split(" ", 2)[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    errors = [line[:200] for line in proc.stdout.splitlines() if line.startswith("E ")][:3]
    return {"rc": proc.returncode, "timed_out": False, "seconds": round(time.time() - start, 1), "failed": failed,
            "errors": errors, "tail": proc.stdout.strip().splitlines()[-1:] if proc.returncode not in (0, 1) else []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutation ids to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.id:34s} {m.file:32s} {m.why}")
        return 0
    unknown = set(args.only or ()) - {m.id for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation ids: {', '.join(sorted(unknown))}")

    with tempfile.TemporaryDirectory(prefix="dpokit-mutation-") as tmp:
        repo = Path(tmp) / "repo"
        copy_repo(repo)
        check = subprocess.run([sys.executable, "-c", "import dpokit; print(dpokit.__file__)"], cwd=repo,
                               env=dict(os.environ, PYTHONPATH=str(repo / "src")), capture_output=True, text=True)
        if not check.stdout.strip().startswith(str(repo)):
            print(f"the copy's dpokit is not the one imported: {check.stdout.strip()}", file=sys.stderr)
            return 2
        stale = [m.id for m in chosen if (repo / m.file).read_text(encoding="utf-8").count(m.old) != 1]
        if stale:
            print(f"mutations that no longer apply exactly once (update them): {', '.join(stale)}", file=sys.stderr)
            return 2
        all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        baseline = run_tests(repo, all_tests, args.timeout * 2)
        print(f"baseline ({len(all_tests)} test targets): rc={baseline['rc']} in {baseline['seconds']} s",
              file=sys.stderr)
        if baseline["rc"] != 0:
            print(json.dumps({"baseline": baseline}, indent=2))
            return 2

        results = []
        for m in chosen:
            path = repo / m.file
            original = path.read_text(encoding="utf-8")
            try:
                path.write_text(original.replace(m.old, m.new, 1), encoding="utf-8")
                outcome = run_tests(repo, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            killed = outcome["timed_out"] or outcome["rc"] != 0
            results.append({"id": m.id, "file": m.file, "why": m.why, "killed": killed, **outcome})
            print(f"{'KILLED ' if killed else 'SURVIVED'} {m.id} ({outcome['seconds']} s) {outcome['failed'][:2]}",
                  file=sys.stderr)

    killed = sum(r["killed"] for r in results)
    by_file: dict[str, list[int]] = {}
    for r in results:
        by_file.setdefault(r["file"], [0, 0])
        by_file[r["file"]][0] += r["killed"]
        by_file[r["file"]][1] += 1
    summary = {
        "mutations": len(results), "killed": killed, "survived": [r["id"] for r in results if not r["killed"]],
        "kill_rate": round(killed / len(results), 3) if results else None,
        "by_file": {f: f"{k}/{n}" for f, (k, n) in by_file.items()},
        "untargeted": f"{sum(r['killed'] for r in results if r['id'] in UNTARGETED)}/"
                      f"{sum(r['id'] in UNTARGETED for r in results)}",
        "baseline_seconds": baseline["seconds"], "results": results,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
