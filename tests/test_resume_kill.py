"""SIGKILL, for real: ``rlhf-lightning fit`` of the PPO config killed at whatever point it has
reached once a checkpoint exists, then resumed with ``--ckpt_path last.ckpt``, gives the
uninterrupted run's export and metrics.csv (one process, and two DDP ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_resume import read_csv

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ppo.yaml"


def small_config(path: Path) -> Path:
    """configs/ppo.yaml with a checkpoint every 2 iterations and the evaluation every 2."""
    cfg = yaml.safe_load(CONFIG.read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 8  # 4 optimizer steps an iteration
        if cb["class_path"].endswith("GoldRewardEval"):
            cb["init_args"].update(every_n_steps=2, max_batches=1)
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(workspace, config, root, extra=(), wait=True):
    cmd = [
        sys.executable,
        "-m",
        "rlhf_lightning.cli",
        "fit",
        "-c",
        str(config),
        "--trainer.max_steps=80",  # 20 iterations: on a fast idle machine 8 ended within 0.5 s of the first checkpoint
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_batch_size=8",
        "--model.init_args.minibatch_size=4",
        "--model.init_args.micro_batch_size=4",
        "--model.init_args.sampling.max_new_tokens=6",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    kw = dict(cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        proc = subprocess.run(cmd, timeout=400, **kw)
        assert proc.returncode == 0, proc.stdout[-4000:]
        return proc
    return subprocess.Popen(cmd, start_new_session=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigkilled_ppo_resumes_to_the_same_export_and_metrics(demo_workspace, tmp_path, ranks):
    config = small_config(tmp_path / "ppo.yaml")
    extra = ["--trainer.accelerator=cpu"]
    if ranks > 1:
        extra += ["--trainer.strategy=ddp", f"--trainer.devices={ranks}"]
    fit(demo_workspace, config, tmp_path / "whole", extra)

    cut = tmp_path / "cut"
    proc = fit(demo_workspace, config, cut, extra, wait=False)
    deadline = time.time() + 300
    while not (cut / "checkpoints/last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere after the first checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "hf").exists(), "the run ended before the kill"
    fit(demo_workspace, config, cut, [*extra, f"--ckpt_path={cut / 'checkpoints/last.ckpt'}"])

    from safetensors.torch import load_file

    whole, resumed = (load_file(root / "hf/model.safetensors") for root in (tmp_path / "whole", cut))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    rows = read_csv(cut / "logs/metrics.csv")
    assert rows == read_csv(tmp_path / "whole/logs/metrics.csv")
    assert any(r.get("eval/gold_reward") for r in rows) and any(r.get("ppo/kl_coef") for r in rows)
