"""Runaway training stops cleanly, exports refuse non-finite weights, one run per directory."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rlhf_lightning.callbacks import HFExport, NonFiniteError, NonFiniteGuard
from rlhf_lightning.data.datamodules import SFTDataModule
from rlhf_lightning.generation import SamplingConfig, sample_responses
from rlhf_lightning.rundir import LOCK_NAME, RunDirInUseError, RunDirLock
from rlhf_lightning.systems.sft import SFTModule
from tests.conftest import quiet_trainer

RECORDS = [{"prompt": f"The movie number {i} was", "response": " great and fun."} for i in range(16)]


def sft_run(tokenizer_dir, tiny_config, tmp_path, lr, action="stop", max_steps=6):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    L.seed_everything(0)
    dm = SFTDataModule(tokenizer=tokenizer_dir, train_file=str(data), val_fraction=0.0, batch_size=4)
    # SGD: a huge learning rate overflows the weights within a few steps (Adam's steps stay bounded).
    module = SFTModule(model_config=tiny_config, tokenizer=tokenizer_dir, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_on_exception=True)
    trainer = quiet_trainer(
        tmp_path, max_steps=max_steps, callbacks=[NonFiniteGuard(action), ckpt, HFExport()], enable_checkpointing=True
    )
    return module, dm, trainer


def finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_runaway_sft_stops_before_the_update_with_a_clear_error(tokenizer_dir, tiny_config, tmp_path):
    module, dm, trainer = sft_run(tokenizer_dir, tiny_config, tmp_path, lr=1e12)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm .* at step \d+ .*--nonfinite.action=skip"):
        trainer.fit(module, datamodule=dm)
    assert finite(module)  # the bad update never landed
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "hf").exists()  # no export of a diverged run


def test_skip_mode_counts_steps_and_keeps_weights_finite(tokenizer_dir, tiny_config, tmp_path):
    module, dm, trainer = sft_run(tokenizer_dir, tiny_config, tmp_path, lr=1e12, action="skip")
    guard = trainer.callbacks[0]
    trainer.fit(module, datamodule=dm)
    assert guard.skipped >= 1
    assert finite(module)


def test_a_healthy_run_is_untouched(tokenizer_dir, tiny_config, tmp_path):
    module, dm, trainer = sft_run(tokenizer_dir, tiny_config, tmp_path, lr=1e-3, max_steps=3)
    trainer.fit(module, datamodule=dm)
    assert trainer.callbacks[0].skipped == 0 and (tmp_path / "hf" / "config.json").exists()


def test_export_refuses_non_finite_weights(tokenizer_dir, tiny_config, tmp_path):
    module = SFTModule(model_config=tiny_config, tokenizer=tokenizer_dir)
    module.configure_model()
    with torch.no_grad():
        next(module.policy.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to export SFTModule .* weight '.*' holds non-finite values"):
        module.export_hf(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("engine", ["hf", "auto"])
def test_sampling_from_a_diverged_policy_says_so(tokenizer_dir, tiny_config, engine):
    module = SFTModule(model_config=tiny_config, tokenizer=tokenizer_dir)
    module.configure_model()
    with torch.no_grad():
        module.policy.get_output_embeddings().weight.fill_(float("nan"))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        sample_responses(
            module.policy, ids, torch.ones_like(ids), 2, 0, SamplingConfig(max_new_tokens=4, engine=engine)
        )


def test_bad_guard_action_is_an_error():
    with pytest.raises(ValueError, match="'stop' or 'skip'"):
        NonFiniteGuard("ignore")


# ----------------------------------------------------------------------------- one run per directory
def test_second_run_in_a_directory_fails_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time,sys; time.sleep(60)"],
    )
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": 0, "command": "rlhf-lightning fit A"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(RunDirInUseError, match=rf"in use by pid {holder.pid} on host .*rlhf-lightning fit A"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    with caplog.at_level(logging.WARNING), RunDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_lock_from_another_host_is_an_error_saying_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunDirInUseError, match=r"host elsewhere.*delete .*\.lock"):
        RunDirLock(tmp_path).acquire()


def test_lock_is_reentrant_in_one_process(tmp_path):
    with RunDirLock(tmp_path), RunDirLock(tmp_path):
        pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_cli_fit_refuses_a_directory_in_use(tokenizer_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 0}))
        from rlhf_lightning.trainer_cli import run_lightning_cli

        with pytest.raises(RunDirInUseError, match="in use by"):
            run_lightning_cli(
                [
                    "fit",
                    "--model=rlhf_lightning.systems.sft.SFTModule",
                    "--model.model_config={hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
                    "num_attention_heads: 2}",
                    "--data=rlhf_lightning.data.datamodules.SFTDataModule",
                    f"--data.tokenizer={tokenizer_dir}",
                    f"--data.train_file={data}",
                    f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.max_steps=1",
                ]
            )
    finally:
        holder.kill()
        holder.wait()


def test_pipeline_refuses_a_run_directory_in_use(tmp_path):
    from rlhf_lightning.pipeline.runner import main

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(RunDirInUseError, match=f"pid {holder.pid}"):
            main(["--run_dir", str(tmp_path), "--only=[data]"])
        assert not (tmp_path / "pipeline.yaml").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_max_steps_zero_leaves_the_export_alone(tokenizer_dir, tiny_config, tmp_path):
    module, dm, trainer = sft_run(tokenizer_dir, tiny_config, tmp_path, lr=1e-3, max_steps=0)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "marker").write_text("earlier export")
    with pytest.warns(UserWarning, match="no optimizer step was taken, so nothing was exported"):
        trainer.fit(module, datamodule=dm)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["marker"]
