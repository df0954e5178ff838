"""benchmarks/gpu.py runs end to end on a CPU in --smoke mode (tiny shape, 2 steps per arm): every arm that can run
here has numbers, the CUDA-only backends are skipped with their reason, and the summary has the issue's keys."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # imports TRL and trains four arms: about 30 s of CPU
def test_gpu_benchmark_smoke_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_tiny_cpu.json").read_text())
    assert set(result["summary"]) == {"device_name", "shape", "best_dpokit_arm", "dpokit_vs_trl", "mfu",
                                      "memory_vs_trl", "raw_peak_memory_vs_trl"}
    assert result["summary"]["device_name"] == "cpu" and result["summary"]["best_dpokit_arm"] == "dpokit_dense"
    assert set(result["arms"]) == {"trl", "dpokit_dense", "dpokit_cached_ref"}
    assert result["skipped"] == {"dpokit_varlen": "varlen needs CUDA (FlashAttention kernels)",
                                 "dpokit_flex": result["self_checks"]["flex"]["reason"]}
    for row in result["arms"].values():
        assert row["pairs_per_s"] > 0 and row["steps_timed"] == 2 and row["step_s_p90"] >= row["step_s_median"]
        assert row["dynamo_graphs_timed"] >= 0 and "peak_above_start_mb" in row
    assert "collation is outside the timed step" in result["timing_note"]
    assert result["arms"]["dpokit_dense"]["step0_check"]["policy_equals_reference"] is True
    assert result["self_checks"]["auto_picks"] == "dense"


@pytest.mark.slow  # the whole GPU command in its CPU smoke mode: TRL, four benchmark arms, a training run
def test_gpu_check_smoke_mode_fits_its_budget_and_file_limit(tmp_path):
    """`GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh` runs every step on the CPU inside the script's own budget
    (its CPU timeouts sum to 470 s) and leaves at most 8 files under $OUT (what comes back from the device machine)."""
    import time

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_SMOKE": "1", "OMP_NUM_THREADS": "1",
           "DPOKIT_CACHE": os.environ["DPOKIT_CACHE"]}
    start = time.time()
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    elapsed = time.time() - start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    report = (out / "gpu.txt").read_text()
    for line in ("gpu.py rc=0", "throughput dpokit-tiny-llama rc=0", "train fp32 rc=0"):
        assert line in report, report
    assert "(budget 470 s)" in report and elapsed < 470, elapsed
    assert {"gpu_tiny_cpu.json", "throughput_dpokit-tiny-llama_cpu.json", "train_summary.json"} <= set(files), files
