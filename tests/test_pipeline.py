"""The one-command pipeline on tiny settings: every stage, skipping, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, '
    '"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}'
)
DEMO_SIZES = '{"n_sft": 96, "n_pairs": 64, "n_val_pairs": 16, "n_prompts": 32, "n_heldout": 8}'


def pipeline_args(run_dir: Path, sft_steps: int = 4) -> list[str]:
    stages = {
        "sft": {
            "config": str(ROOT / "configs/sft.yaml"),
            "overrides": {
                "model.init_args.model_config": json.loads(TINY),
                "trainer.max_steps": sft_steps,
                "trainer.enable_progress_bar": False,
                "trainer.limit_val_batches": 1,
            },
        },
        "reward": {
            "config": str(ROOT / "configs/reward.yaml"),
            "overrides": {"trainer.max_steps": 2, "trainer.enable_progress_bar": False, "trainer.limit_val_batches": 1},
        },
        "ppo": {
            "config": str(ROOT / "configs/ppo.yaml"),
            "overrides": {
                "trainer.max_steps": 4,
                "trainer.enable_progress_bar": False,
                "data.init_args.batch_size": 4,
                "model.init_args.minibatch_size": 4,
                "model.init_args.sampling": {"max_new_tokens": 6},
                "data.init_args.val_batch_size": 8,
            },
        },
        "dpo": {
            "config": str(ROOT / "configs/dpo.yaml"),
            "overrides": {"trainer.max_steps": 2, "trainer.enable_progress_bar": False, "trainer.limit_val_batches": 1},
        },
    }
    return [
        "pipeline",
        "-c",
        str(ROOT / "configs/quickstart.yaml"),
        f"--run_dir={run_dir}",
        f'--data={{"demo": true, "demo_sizes": {DEMO_SIZES}}}',
        f"--stages={json.dumps(stages)}",
        '--evaluate={"max_new_tokens": 6, "max_prompts": 8}',
    ]


@pytest.mark.slow
def test_pipeline_end_to_end_interrupt_and_resume(tmp_path, capsys, monkeypatch):
    from rlhf_lightning.systems.sft import SFTModule

    run_dir = tmp_path / "run"
    original_step = SFTModule.training_step
    calls = []

    def interrupted_step(self, batch, batch_idx):
        calls.append(self.global_step)
        if self.global_step == 2:
            raise RuntimeError("simulated crash")  # a node dying, say, in the middle of SFT
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(SFTModule, "training_step", interrupted_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main(pipeline_args(run_dir))
    assert "stage sft stopped; run the same command with --resume" in capsys.readouterr().out
    assert (run_dir / "sft/checkpoints/last.ckpt").exists() and not (run_dir / "sft/hf").exists()

    calls.clear()
    monkeypatch.setattr(
        SFTModule, "training_step", lambda self, b, i: calls.append(self.global_step) or original_step(self, b, i)
    )
    capsys.readouterr()
    cli_main(pipeline_args(run_dir) + ["--resume=true"])
    out = capsys.readouterr().out
    assert "stage 1/7: data (already done: skipped)" in out
    assert f"resuming sft from {run_dir / 'sft/checkpoints/last.ckpt'}" in out
    assert calls == [2, 3]  # continued at step 2 instead of starting over
    assert torch.load(run_dir / "sft/checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
    assert "stage 7/7: report" in out
    for stage in ("sft", "reward", "ppo", "dpo"):
        assert (run_dir / stage / "hf" / "config.json").exists(), stage
        assert (run_dir / stage / "config.yaml").exists()  # the resolved stage config, re-runnable by hand
    evaluation = json.loads((run_dir / "eval.json").read_text())["policies"]
    assert set(evaluation) == {"sft", "ppo", "dpo"}
    for name, m in evaluation.items():
        for key in (
            "gold_reward_mean",
            "proxy_reward_mean",
            "kl_to_ref",
            "eos_rate",
            "response_length_mean",
            "distinct_2",
            "win_rate_vs_sft_gold",
        ):
            assert key in m, (name, key)
    assert evaluation["sft"]["kl_to_ref"] == 0.0 and evaluation["sft"]["win_rate_vs_sft_gold"] == 0.5
    report = (run_dir / "report.md").read_text()
    assert "ppo" in report and "dpo" in report
    figures = list((run_dir / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 1000 and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    state = json.loads((run_dir / "pipeline_state.json").read_text())["stages"]
    assert {"sft", "reward", "ppo", "dpo", "evaluate"} <= set(state)
    # Another call finds every export and skips every training stage.
    capsys.readouterr()
    cli_main(pipeline_args(run_dir) + ["--only=[sft, reward, ppo, dpo]"])
    assert capsys.readouterr().out.count("already done: skipped") == 4


# ----------------------------------------------------------------------------- stage registry and wiring


def _pipeline(run_dir: Path, **cfg):
    from rlhf_lightning.pipeline import Pipeline

    return Pipeline({"run_dir": str(run_dir), "seed": 3, "gold_reward": "pkg.mod:gold", "data": None, **cfg})


def test_stage_config_sets_only_inputs_root_dir_seed_and_overrides(tmp_path):
    import yaml

    from rlhf_lightning.pipeline import STAGES, config_path

    run_dir = tmp_path / "run"
    (run_dir / "sft/hf").mkdir(parents=True)
    (run_dir / "sft/hf/config.json").write_text("{}")
    (run_dir / "reward/hf").mkdir(parents=True)
    (run_dir / "reward/hf/config.json").write_text("{}")
    p = _pipeline(run_dir, stages={"ppo": {"overrides": {"trainer.max_steps": 7}}})
    cfg = p.stage_config(STAGES["ppo"])
    shipped = yaml.safe_load(config_path("ppo.yaml").read_text())
    assert cfg["inputs"] == {
        "tokenizer": str(run_dir / "data/tokenizer"),
        "sft": str(run_dir / "sft/hf"),
        "reward": str(run_dir / "reward/hf"),
        "prompts_file": str(run_dir / "data/prompts_train.jsonl"),
        "heldout_prompts_file": str(run_dir / "data/prompts_heldout.jsonl"),
        "gold_reward": "pkg.mod:gold",
    }
    assert cfg["trainer"]["default_root_dir"] == str(run_dir / "ppo")
    assert cfg["seed_everything"] == 3 and cfg["trainer"]["max_steps"] == 7
    # Nothing else of the stage's YAML is touched: no path rewriting, no callback patching.
    for key in ("inputs", "seed_everything"):
        cfg.pop(key), shipped.pop(key)
    for key in ("default_root_dir", "max_steps"):
        cfg["trainer"].pop(key), shipped["trainer"].pop(key)
    assert cfg == shipped


def test_missing_export_names_the_stage_that_writes_it(tmp_path):
    from rlhf_lightning.pipeline import STAGES

    p = _pipeline(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"stage 'reward' reads the export of stage 'sft'.*run the 'sft' stage"):
        p.stage_config(STAGES["reward"])


def test_a_new_stage_is_one_registry_entry_plus_its_config(tmp_path, monkeypatch):
    import yaml

    from rlhf_lightning.pipeline import STAGES, Stage, config_path, register_stage
    from rlhf_lightning.pipeline import stages as stages_module

    monkeypatch.setattr(stages_module, "STAGES", dict(STAGES))
    monkeypatch.setattr("rlhf_lightning.pipeline.runner.STAGES", stages_module.STAGES)
    config = tmp_path / "dpo_strong.yaml"
    config.write_text(config_path("dpo.yaml").read_text().replace("beta: 0.1", "beta: 0.5"))
    stage = Stage("dpo_strong", consumes=STAGES["dpo"].consumes, config=str(config), policy=True)
    register_stage(stage)
    run_dir = tmp_path / "run"
    (run_dir / "sft/hf").mkdir(parents=True)
    (run_dir / "sft/hf/config.json").write_text("{}")
    cfg = _pipeline(run_dir).stage_config(stage)
    assert cfg["model"]["init_args"]["beta"] == 0.5
    assert cfg["inputs"]["sft"] == str(run_dir / "sft/hf")
    assert cfg["trainer"]["default_root_dir"] == str(run_dir / "dpo_strong")
    assert "dpo_strong" in stages_module.STAGES and yaml.safe_dump(cfg)
    with pytest.raises(ValueError, match="already registered"):
        register_stage(stage)


def test_unknown_stage_names_fail_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["pipeline", f"--run_dir={tmp_path / 'run'}", "--only=[sft, rewrad]"])
    assert "rewrad" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_default_root_dir_moves_every_output_path(capsys):
    import yaml

    with pytest.raises(SystemExit):
        cli_main(
            [
                "fit",
                "-c",
                str(ROOT / "configs/ppo.yaml"),
                "--trainer.default_root_dir=/elsewhere/ppo",
                "--inputs.sft=/exports/sft",
                "--print_config",
            ]
        )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert {lg["init_args"]["save_dir"] for lg in cfg["trainer"]["logger"]} == {"/elsewhere/ppo"}
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in cfg["trainer"]["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == "/elsewhere/ppo/checkpoints"
    assert cfg["model"]["init_args"]["model"] == "/exports/sft"
    assert cfg["model"]["init_args"]["reward_model"] == "runs/demo/reward/hf"  # the config's own default


@pytest.mark.slow
def test_pipeline_runs_from_a_non_editable_install(tmp_path):
    # A wheel installed elsewhere: the stage configs must come from the package, not a checkout.
    import os
    import shutil
    import subprocess
    import sys

    wheel_dir, site, src = tmp_path / "wheel", tmp_path / "site", tmp_path / "src"
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree.
    skip = {".git", ".venv", "runs", "build", "data", "rlhf_lightning.egg-info", ".pytest_cache", ".ruff_cache"}
    shutil.copytree(ROOT, src, ignore=lambda folder, names: [n for n in names if Path(folder) == ROOT and n in skip])
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("rlhf_lightning-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stages = {
        "sft": {
            "overrides": {
                "model.init_args.model_config": json.loads(TINY),
                "trainer.max_steps": 2,
                "trainer.enable_progress_bar": False,
                "trainer.limit_val_batches": 1,
            }
        }
    }
    code = (
        "import rlhf_lightning, sys; assert rlhf_lightning.__file__.startswith(sys.argv[1]), rlhf_lightning.__file__; "
        "from rlhf_lightning.cli import cli_main; cli_main(sys.argv[2:])"
    )
    args = [
        sys.executable,
        "-c",
        code,
        str(site),
        "pipeline",
        "--run_dir=run",
        "--only=[data, sft]",
        f'--data={{"demo": true, "demo_sizes": {DEMO_SIZES}}}',
        f"--stages={json.dumps(stages)}",
    ]
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "run/sft/hf/model.safetensors").exists()
    assert (elsewhere / "run/sft/checkpoints/last.ckpt").exists()


def test_a_stage_variant_runs_before_evaluation(monkeypatch):
    from rlhf_lightning.pipeline import STAGES, derive_stage
    from rlhf_lightning.pipeline import stages as stages_module

    monkeypatch.setattr(stages_module, "STAGES", dict(STAGES))
    monkeypatch.setattr("rlhf_lightning.pipeline.runner.STAGES", stages_module.STAGES)
    stage = derive_stage("grpo_gold", like="grpo")
    assert derive_stage("grpo_gold", like="grpo") == stage  # idempotent
    names = list(stages_module.STAGES)
    assert names.index("grpo") < names.index("grpo_gold") < names.index("evaluate")
    assert stage.consumes == STAGES["grpo"].consumes and stage.config == "grpo.yaml" and stage.policy
    with pytest.raises(ValueError, match="must name a training stage"):
        derive_stage("x", like="report")
