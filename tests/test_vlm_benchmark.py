"""benchmarks/vlm_throughput.py end to end at a tiny setting (issue 29): both arms run in their own processes on the
same pairs and the JSON carries pairs/s, peak memory and the ratios; the layouts are what each side says it does
(dpokit's towers encode each pair's image once, TRL's twice) and the pairs have the lengths asked for. No timing is
asserted here: the numbers live in the benchmark's JSON."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # three Python processes (the model build, one per arm) importing torch, transformers and TRL:
# about 45-65 s on the 2-core development CPU, over the fast suite's ~60 s a test
def test_vlm_benchmark_tiny_runs_both_arms_and_writes_json(tmp_path):
    out = tmp_path / "vlm.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vlm_throughput.py"), "--size", "tiny",
                          "--image-tokens", "16", "--answer-tokens", "8", "--batch-size", "2", "--warmup-steps", "1",
                          "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"cpu", "versions", "model", "settings", "arms", "ratios_dpokit_over_trl", "target", "meets_target"} <= \
        set(result)
    assert result["cpu"] and all(result["versions"][k] for k in ("torch", "transformers", "trl"))
    assert result["settings"]["freeze_vision"] is True and result["settings"]["dtype"] == "fp32"
    assert result["model"]["params"] > 0 and result["model"]["image_tokens_per_prompt"] == 16
    assert set(result["arms"]) == {"dpokit", "trl"}
    for row in result["arms"].values():
        assert row["pairs_per_s"] > 0 and row["peak_memory_mb"] > 0 and len(row["step_s_each"]) == 1
    ours, theirs = result["arms"]["dpokit"], result["arms"]["trl"]
    assert ours["encode_s"] > 0 and 0 < ours["pairs_per_s_with_encode"] < ours["pairs_per_s"]
    # each pair once with its image once, the reference reusing the policy's frozen-tower encodes (both steps),
    # against TRL's two rows per pair in both models
    assert ours["images_encoded_per_step"] == {"policy": 2, "reference": 0}
    assert ours["reference_reused_policy_encodes"] == 2
    assert theirs["images_encoded_per_step"] == {"policy": 4, "reference": 4}
    assert ours["layout"]["image_tokens"] == 16
    assert ours["layout"]["chosen_tokens"] == ours["layout"]["rejected_tokens"] == 8
    assert theirs["layout"]["completion_tokens_per_row"] == 8
    assert theirs["layout"]["row_tokens"] == ours["layout"]["prompt_tokens"] + 8  # the same prompt on both sides
    assert ours["layout"]["row_tokens"] == ours["layout"]["prompt_tokens"] + 16
    for key, value in result["ratios_dpokit_over_trl"].items():
        assert value > 0, key
    assert "dpokit / TRL" in res.stdout and "wrote" in res.stdout
