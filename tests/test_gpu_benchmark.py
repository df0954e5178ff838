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
                                      "memory_vs_trl"}
    assert result["summary"]["device_name"] == "cpu" and result["summary"]["best_dpokit_arm"] == "dpokit_dense"
    assert set(result["arms"]) == {"trl", "dpokit_dense", "dpokit_cached_ref"}
    assert result["skipped"] == {"dpokit_varlen": "varlen needs CUDA (FlashAttention kernels)",
                                 "dpokit_flex": result["self_checks"]["flex"]["reason"]}
    for row in result["arms"].values():
        assert row["pairs_per_s"] > 0 and row["steps_timed"] == 2 and row["step_s_p90"] >= row["step_s_median"]
    assert result["arms"]["dpokit_dense"]["step0_check"]["policy_equals_reference"] is True
    assert result["self_checks"]["auto_picks"] == "dense"
