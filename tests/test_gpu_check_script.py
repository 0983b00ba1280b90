"""scripts/gpu_check.py, the GPU check, runs its code paths on the CPU with ``--tiny`` (a tiny model):
it must not rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_its_checks_on_the_cpu(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    root = ["--root", str(tmp_path / "root")]
    subprocess.run([sys.executable, str(SCRIPT), "prepare", *root, "--tiny"], env=env, check=True, timeout=300)
    out = tmp_path / "out.jsonl"
    check = "ppo_lora_fsdp2_bf16"  # LoRA, bf16-mixed, online RL with a critic, FSDP2 (one rank): one process
    cmd = [sys.executable, str(SCRIPT), "run", *root, "--tiny", "--check", check, "--steps", "3", "--json", str(out)]
    subprocess.run(cmd, env=env, check=True, timeout=300, capture_output=True)
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["status"] == "ok", result
    assert result["check"] == check and result["lora"] and result["fsdp"] and result["devices"] == 1
    assert 0 < result["trainable_params"] < result["params"] and result["samples_per_s"] > 0
    assert result["time_generate"] > 0 and result["time_learn"] > 0
