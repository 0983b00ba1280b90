"""The command line: every config parses and round-trips, runs a fast_dev_run, and DDP on CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_lightning.cli import cli_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Not Lightning stage configs: pipeline and sweep configs, the CAI data stages' settings, constitutions.
NOT_FIT = {"predict.yaml", "quickstart.yaml", "frontier.yaml", "cai.yaml", "cai_revise.yaml", "cai_label.yaml"}
FIT_CONFIGS = sorted(
    p.name for p in CONFIGS.glob("*.yaml") if p.name not in NOT_FIT and not p.name.startswith("constitution_")
)
# Inputs a stage config's defaults do not find in the demo workspace.
WORKSPACE_INPUTS = {"sl_cai.yaml": ["--inputs.cai_sft_file=data/demo/sft.jsonl"]}


def _print_config(config: str, capsys, extra=()) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "-c", config, *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", FIT_CONFIGS + ["predict.yaml"])
def test_config_print_round_trips(name, capsys, tmp_path):
    printed = _print_config(str(CONFIGS / name), capsys)
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["class_path"].startswith("rlhf_lightning.")
    # The tokenizer is given once under data and linked into the model.
    assert "tokenizer" in parsed["data"]["init_args"]
    again_file = tmp_path / "printed.yaml"
    again_file.write_text(printed)
    assert yaml.safe_load(_print_config(str(again_file), capsys)) == parsed


def _weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(export / "model.safetensors")


@pytest.mark.parametrize("name", FIT_CONFIGS)
def test_fast_dev_run_every_stage_config(name, demo_workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(demo_workspace)
    # default_root_dir -> tmp_path: HFExport writes tmp_path/hf, so the workspace's SFT and reward
    # exports, which the other stages and tests read, stay as the fixture built them.
    cli = cli_main(
        [
            "fit",
            "-c",
            str(CONFIGS / name),
            "--trainer.fast_dev_run=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            *WORKSPACE_INPUTS.get(name, []),
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step >= 1  # it trained

    # The export is the next stage's input: it loads with plain transformers, model and tokenizer agree.
    export = tmp_path / "hf"
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    auto = AutoModelForSequenceClassification if name == "reward.yaml" else AutoModelForCausalLM
    model = auto.from_pretrained(export)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().num_embeddings >= len(tok)

    weights = _weights(export)
    sft = _weights(demo_workspace / "runs/demo/sft/hf")
    if name == "sft.yaml":  # from scratch, the architecture of the config's model_config
        assert (model.config.hidden_size, model.config.num_hidden_layers) == (256, 4)
    elif name == "reward.yaml":  # one-label head, normalisation stored, backbone trained from the SFT export
        assert model.config.num_labels == 1 and "score.weight" in weights
        gain, bias = model.config.rlhf_reward_gain, model.config.rlhf_reward_bias
        assert math.isfinite(gain) and math.isfinite(bias) and (gain, bias) != (1.0, 0.0)
        assert any(not torch.equal(weights[k], sft[k]) for k in weights.keys() & sft.keys())
    else:  # DPO, PPO: the trained policy (not the critic, not the frozen reference) moved off the SFT start
        assert weights.keys() == sft.keys()
        assert any(not torch.equal(weights[k], sft[k]) for k in sft)


def test_predict_writes_jsonl(demo_workspace, monkeypatch):
    monkeypatch.chdir(demo_workspace)
    out = demo_workspace / "runs/demo/pred.jsonl"
    cli_main(
        [
            "predict",
            "-c",
            str(CONFIGS / "predict.yaml"),
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.init_args.output=" + str(out),
            "--model.init_args.sampling.max_new_tokens=4",
        ]
    )
    lines = out.read_text().splitlines()
    assert len(lines) == 16  # every held-out prompt of the small workspace
    assert all({"prompt", "response", "ended_with_eos"} <= set(yaml.safe_load(line)) for line in lines)


def test_bad_record_error_names_file_and_line(demo_workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(demo_workspace)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": " b."}\n{"prompt": "c", "response": " d."}\n{"prompt": "e", \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3:"):
        cli_main(
            ["fit", "-c", str(CONFIGS / "sft.yaml"), "--trainer.fast_dev_run=1", f"--data.init_args.train_file={bad}"]
        )


@pytest.mark.slow
def test_sft_ddp_two_processes_on_cpu(demo_workspace, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rlhf_lightning.cli",
        "fit",
        "-c",
        str(CONFIGS / "sft.yaml"),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.group_by_length=true",  # the custom sampler under Lightning's DDP wrapper
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.init_args.dirpath={tmp_path}/hf",
        '--model.init_args.model_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}',
    ]
    proc = subprocess.run(cmd, cwd=demo_workspace, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_console_script_exits_zero_on_success(tmp_path):
    # The installed `rlhf-lightning` script: a shell `&&` chain must go on after a successful run.
    script = Path(sys.executable).parent / "rlhf-lightning"
    assert script.exists(), "install the package (pip install -e .) to get the console script"
    proc = subprocess.run(
        [
            str(script),
            "demo-data",
            "--out",
            str(tmp_path / "d"),
            "--n-sft",
            "40",
            "--n-pairs",
            "8",
            "--n-val-pairs",
            "4",
            "--n-prompts",
            "8",
            "--n-heldout",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "d" / "summary.json").is_file()


def test_reward_functions_from_the_command_line(demo_workspace, tmp_path, monkeypatch):
    # GRPO scored by a reward function named on the command line (YAML gives it as a mapping).
    monkeypatch.chdir(demo_workspace)
    cli_main(
        [
            "fit",
            "-c",
            str(CONFIGS / "grpo.yaml"),
            "--trainer.fast_dev_run=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.reward_model=null",
            "--model.init_args.reward_functions=[{function: rlhf_lightning.data.demo:gold_reward_batch, weight: 2.0}]",
        ]
    )
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_resumed_run_logs_on_to_its_wandb_run(demo_workspace, monkeypatch, tmp_path):
    """``fit --ckpt_path`` gives a config's WandbLogger the id of the run the checkpoint was
    logged to (``resume.continue_wandb_runs``): one W&B run, not one per restart."""
    monkeypatch.chdir(demo_workspace)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overlay = tmp_path / "wandb.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"logger": [
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"project": "resume-test", "save_dir": str(tmp_path), "offline": True}},
    ]}}))  # fmt: skip
    common = ["fit", "-c", str(CONFIGS / "sft.yaml"), "-c", str(overlay), f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"]  # fmt: skip
    cli_main([*common, "--trainer.max_epochs=1"])  # two steps; last.ckpt at the epoch's end
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, weights_only=True)["wandb_run_ids"]
    assert len(first) == 1 and first[0]
    cli = cli_main([*common, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"])
    assert cli.trainer.global_step == 4 and cli.trainer.logger.version == first[0]
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{first[0]}") for r in runs)  # two segments, one run id
    assert torch.load(ckpt, weights_only=True)["wandb_run_ids"] == first


def test_a_failed_run_ends_its_wandb_run(demo_workspace, monkeypatch, tmp_path):
    """A stage that fails ends its W&B run, so the next one run in the same process (a sweep
    point after a failed one) starts its own rather than logging into it."""
    import wandb

    from rlhf_lightning.systems.sft import SFTModule

    monkeypatch.chdir(demo_workspace)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def fail(self, batch, batch_idx):
        self.log("sft/loss", 1.0)  # the logger starts its run
        raise RuntimeError("failed stage")

    monkeypatch.setattr(SFTModule, "training_step", fail)
    with pytest.raises(RuntimeError, match="failed stage"):
        cli_main(["fit", "-c", str(CONFIGS / "sft.yaml"), f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
                  '--trainer.logger=[{"class_path": "lightning.pytorch.loggers.WandbLogger", '
                  f'"init_args": {{"project": "t", "save_dir": "{tmp_path}", "offline": true}}}}]'])  # fmt: skip
    assert list((tmp_path / "wandb").glob("offline-run-*")) and wandb.run is None
