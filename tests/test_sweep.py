"""``rlhf-lightning sweep``: grid expansion and validation, point configs, SLURM scripts, and a tiny
sweep end to end with skip-if-done and resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import cli_main
from rlhf_lightning.pipeline.sweep import Point, Sweep, SweepConfigError, expand_grid, slurm_scripts
from tests.conftest import TINY_MODEL_CONFIG

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- grid expansion


def test_grid_is_the_product_of_values_then_seeds_in_order():
    points = expand_grid(
        {
            "dpo": {
                "grid": {"model.init_args.beta": [0.1, 0.3], "model.init_args.optimizer.init_args.lr": [1e-4, 3e-4]}
            },
            "grpo_gold": {"stage": "grpo", "grid": {"model.init_args.init_kl_coef": [0.04]}, "seeds": [7]},
        },
        seeds=[0, 1],
    )
    assert [p.name for p in points] == [
        "dpo/beta=0.1,lr=0.0001/seed0",
        "dpo/beta=0.1,lr=0.0001/seed1",
        "dpo/beta=0.1,lr=0.0003/seed0",
        "dpo/beta=0.1,lr=0.0003/seed1",
        "dpo/beta=0.3,lr=0.0001/seed0",
        "dpo/beta=0.3,lr=0.0001/seed1",
        "dpo/beta=0.3,lr=0.0003/seed0",
        "dpo/beta=0.3,lr=0.0003/seed1",
        "grpo_gold/init_kl_coef=0.04/seed7",
    ]
    assert points[0].stage == "dpo" and points[-1].stage == "grpo"
    assert points[3].setting == {"model.init_args.beta": 0.1, "model.init_args.optimizer.init_args.lr": 3e-4}
    assert expand_grid({"ppo": {}}, seeds=[0])[0].name == "ppo/default/seed0"  # no grid: seeds only


@pytest.mark.parametrize(
    ("sweeps", "seeds", "message"),
    [
        ({}, [0], "at least one sweep"),
        ({"dpo": {"grid": {"model.init_args.beta": []}}}, [0], r"grid.model.init_args.beta: expected a non-empty list"),
        ({"dpo": {"grid": {"model.init_args.beta": 0.1}}}, [0], "expected a non-empty list"),
        ({"dpo": {"grid": {"model..beta": [1]}}}, [0], "not a dotted key"),
        ({"dpo": {"grid": [1, 2]}}, [0], r"grid: expected \{dotted.key"),
        ({"dpo": {"gird": {}}}, [0], r"unknown key\(s\) \['gird'\]"),
        ({"evaluate": {}}, [0], "'evaluate' is not a training stage"),
        ({"x": {"stage": "nope"}}, [0], "'nope' is not a training stage"),
        ({"dpo": {}}, [], "seeds: expected a non-empty list of integers"),
        ({"dpo": {"seeds": [0.5]}}, [0], "seeds: expected a non-empty list of integers"),
        ({"dpo": {"grid": {"a.beta": [1]}, "overrides": {"a.beta": 2}}}, [0], "both in grid and overrides"),
        ({"dpo": {"grid": {"a.loss_fn": ["x/y", "x_y"]}}}, [0], "two points share a directory"),
    ],
)
def test_bad_grids_fail_with_the_key_named(sweeps, seeds, message):
    with pytest.raises(SweepConfigError, match=message):
        expand_grid(sweeps, seeds)


def _sweep(tmp_path, **cfg) -> Sweep:
    base = {
        "data": {"demo": True},
        "gold_reward": "rlhf_lightning.data.demo:gold_reward",
        "stages": {"sft": {}, "reward": {}},
    }
    return Sweep({"run_dir": str(tmp_path / "sw"), "seed": 5, "seeds": [0], "base": base, **cfg})


def test_a_point_reads_the_base_inputs_and_runs_only_its_stage_and_evaluation(tmp_path):
    sweep = _sweep(
        tmp_path,
        sweeps={"ppo": {"overrides": {"trainer.max_steps": 8}, "grid": {"model.init_args.init_kl_coef": [0.1]}}},
        seeds=[3],
        evaluate={"max_prompts": 10},
    )
    (point,) = sweep.points
    cfg = sweep.point_config(point)
    base = tmp_path / "sw" / "base"
    assert cfg["run_dir"] == str(tmp_path / "sw/points/ppo/init_kl_coef=0.1/seed3")
    assert cfg["seed"] == 3  # training seed of the point
    assert cfg["evaluate"] == {"max_prompts": 10, "seed": 5}  # one evaluation stream for every point
    assert cfg["only"] == ["ppo", "evaluate"] and cfg["resume"] is True
    assert cfg["exports"]["sft"] == str(base / "sft/hf") and cfg["exports"]["reward"] == str(base / "reward/hf")
    assert set(cfg["exports"]) == {"sft", "reward"}  # what PPO and the evaluation read, nothing else
    assert cfg["data"]["prompts_file"] == str(base / "data/prompts_train.jsonl")
    assert cfg["data"]["tokenizer"] == str(base / "data/tokenizer") and cfg["data"]["demo"] is False
    assert cfg["stages"] == {"ppo": {"overrides": {"trainer.max_steps": 8, "model.init_args.init_kl_coef": 0.1}}}

    from rlhf_lightning.pipeline import STAGES, Pipeline

    stage_cfg = Pipeline(cfg).stage_config(STAGES["ppo"], check=False)
    assert stage_cfg["inputs"]["sft"] == str(base / "sft/hf")
    assert stage_cfg["model"]["init_args"]["init_kl_coef"] == 0.1 and stage_cfg["trainer"]["max_steps"] == 8
    assert stage_cfg["seed_everything"] == 3
    assert stage_cfg["trainer"]["default_root_dir"] == cfg["run_dir"] + "/ppo"


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"model.init_args.init_kl_coefx": [0.1]}, "init_kl_coefx"),  # unknown key
        ({"model.init_args.init_kl_coef": ["lots"]}, "init_kl_coef"),  # wrong type
        ({"trainer.max_stepz": [3]}, "max_stepz"),
    ],
)
def test_a_bad_key_or_value_fails_before_anything_runs(tmp_path, capsys, grid, message):
    run_dir = tmp_path / "sw"
    argv = ["sweep", f"--run_dir={run_dir}", f"--sweeps={json.dumps({'grpo': {'grid': grid}})}"]
    with pytest.raises(SystemExit):
        cli_main(argv)
    err = capsys.readouterr().err
    assert message in err and "sweeps.grpo" in err
    assert not run_dir.exists()  # nothing was written, nothing ran


def test_dry_run_lists_points_and_runs_nothing(tmp_path, capsys):
    run_dir = tmp_path / "sw"
    sweeps = {"dpo": {"grid": {"model.init_args.beta": [0.1, 0.5]}}}
    argv = ["sweep", f"--run_dir={run_dir}", f"--sweeps={json.dumps(sweeps)}", "--seeds=[1]", "--dry_run=true"]
    points = cli_main(argv)
    assert [p.name for p in points] == ["dpo/beta=0.1/seed1", "dpo/beta=0.5/seed1"]
    assert "todo  dpo/beta=0.5/seed1" in capsys.readouterr().out and not run_dir.exists()


def test_the_shipped_frontier_config_parses_and_has_the_demo_grid():
    sweep = Sweep(yaml.safe_load((ROOT / "configs/frontier.yaml").read_text()))
    sweep.validate()
    by_method: dict[str, set] = {}
    for p in sweep.points:
        by_method.setdefault(p.method, set()).add(p.setting_label)
    assert {m: len(s) for m, s in by_method.items()} == {"ppo": 4, "dpo": 4, "grpo": 4}
    assert len(sweep.points) == 36  # x 3 seeds
    assert sweep.cfg["best_of_n"]["n"][-1] == 64


# ----------------------------------------------------------------------------- SLURM


def test_slurm_scripts_for_a_small_grid():
    scripts = slurm_scripts(
        run_dir="/scratch/sw",
        n_points=3,
        base_config="/scratch/sw/base.yaml",
        sweep_config="/scratch/sw/sweep.yaml",
        workdir="/home/me/project",
        partition="gpu",
        time_limit="02:00:00",
        gpus_per_task=1,
        cpus_per_task=8,
        max_parallel=2,
        setup="source .venv/bin/activate",
    )
    header = "#SBATCH --partition=gpu\n#SBATCH --time=02:00:00\n#SBATCH --cpus-per-task=8\n#SBATCH --gpus-per-task=1\n"
    assert scripts["points.sbatch"] == (
        "#!/bin/bash\n#SBATCH --job-name=sweep-points\n#SBATCH --output=/scratch/sw/slurm/sweep-points-%A_%a.log\n"
        + header
        + "#SBATCH --array=0-2%2\nset -euo pipefail\ncd /home/me/project\nsource .venv/bin/activate\n"
        'point=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" /scratch/sw/slurm/points.txt)\n'
        'srun rlhf-lightning pipeline -c "$point"\n'
    )
    assert scripts["base.sbatch"] == (
        "#!/bin/bash\n#SBATCH --job-name=sweep-base\n#SBATCH --output=/scratch/sw/slurm/sweep-base-%A_%a.log\n"
        + header
        + "set -euo pipefail\ncd /home/me/project\nsource .venv/bin/activate\n"
        "rlhf-lightning pipeline -c /scratch/sw/base.yaml\n"
    )
    assert scripts["report.sbatch"].endswith("rlhf-lightning sweep -c /scratch/sw/sweep.yaml --report_only true\n")
    assert scripts["submit.sh"] == (
        "#!/bin/bash\nset -euo pipefail\ncd /scratch/sw/slurm\n"
        "base=$(sbatch --parsable base.sbatch)\n"
        'points=$(sbatch --parsable --dependency=afterok:"$base" points.sbatch)\n'
        'sbatch --dependency=afterany:"$points" report.sbatch\n'
    )


def test_write_slurm_lists_the_points_to_run_and_their_configs(tmp_path):
    sweep = _sweep(tmp_path, sweeps={"dpo": {"grid": {"model.init_args.beta": [0.1, 0.2]}}}, seeds=[0])
    done = sweep.point_dir(sweep.points[0])
    done.mkdir(parents=True)
    (done / "eval.json").write_text("{}")
    out = sweep.write_slurm({"partition": "gpu"})
    lines = (out / "points.txt").read_text().splitlines()
    assert lines == [str((sweep.point_dir(sweep.points[1]) / "point.yaml").resolve())]  # the finished one is left out
    point_cfg = yaml.safe_load(Path(lines[0]).read_text())
    assert point_cfg["only"] == ["dpo", "evaluate"] and point_cfg["seed"] == 0
    base_cfg = yaml.safe_load((tmp_path / "sw/base.yaml").read_text())
    assert base_cfg["only"] == ["data", "sft", "reward", "evaluate"]
    assert "#SBATCH --array=0-0\n" in (out / "points.sbatch").read_text()
    assert json.loads((tmp_path / "sw/points.json").read_text())[1]["dir"] == "points/dpo/beta=0.2/seed0"
    # Each point is an ordinary pipeline command, and that command parses it.
    from rlhf_lightning.pipeline.runner import build_parser

    build_parser().parse_args(["-c", lines[0]])


def test_a_point_run_with_another_config_stops_the_sweep_before_it_starts(tmp_path, capsys):
    run_dir = tmp_path / "sw"
    sweeps = {"dpo": {"overrides": {"trainer.max_steps": 5}, "grid": {"model.init_args.beta": [0.1, 0.5]}}}
    argv = ["sweep", f"--run_dir={run_dir}", "--seeds=[0]", "--dry_run=true"]
    cli_main([*argv, f"--sweeps={json.dumps(sweeps)}"])
    sweep = Sweep({"run_dir": str(run_dir), "seeds": [0], "sweeps": sweeps})
    for point in sweep.points:
        sweep.write_point_config(point)  # as a run leaves them
    assert sweep.stale_points() == []
    cli_main([*argv, f"--sweeps={json.dumps(sweeps)}"])  # the same config again: fine

    sweeps["dpo"]["overrides"]["trainer.max_steps"] = 50  # then the fixed overrides change
    with pytest.raises(SystemExit):
        cli_main([*argv, f"--sweeps={json.dumps(sweeps)}"])
    err = capsys.readouterr().err
    assert "2 point(s)" in err and "dpo/beta=0.1/seed0" in err and "ran with another config" in err


def test_point_describe_matches_its_directory(tmp_path):
    p = Point("ppo", "ppo", {"model.init_args.init_kl_coef": 0.1}, 2)
    row = p.describe()
    assert row["dir"] == "points/ppo/init_kl_coef=0.1/seed2" and row["setting_label"] == "init_kl_coef=0.1"
    assert row["seed"] == 2 and row["stage"] == "ppo" and row["setting"] == {"model.init_args.init_kl_coef": 0.1}


# ----------------------------------------------------------------------------- end to end

TINY = {k: v for k, v in TINY_MODEL_CONFIG.items() if k != "tie_word_embeddings"}
QUIET = {"trainer.enable_progress_bar": False, "trainer.limit_val_batches": 1}


def _tiny_sweep_args(run_dir: Path) -> list[str]:
    base = {
        "data": {
            "demo": True,
            "demo_sizes": {"n_sft": 64, "n_pairs": 32, "n_val_pairs": 8, "n_prompts": 16, "n_heldout": 6},
        },
        "gold_reward": "rlhf_lightning.data.demo:gold_reward",
        "stages": {
            "sft": {"overrides": {"model.init_args.model_config": TINY, "trainer.max_steps": 2, **QUIET}},
            "reward": {"overrides": {"trainer.max_steps": 1, **QUIET}},
        },
    }
    sweeps = {"dpo": {"overrides": {"trainer.max_steps": 2, **QUIET}, "grid": {"model.init_args.beta": [0.1, 0.5]}}}
    return [
        "sweep",
        f"--run_dir={run_dir}",
        f"--base={json.dumps(base)}",
        f"--sweeps={json.dumps(sweeps)}",
        "--seeds=[0]",
        '--best_of_n={"n": [1, 2, 4], "max_prompts": 3, "batch_size": 8}',
        '--evaluate={"max_new_tokens": 6, "max_prompts": 6}',
    ]


@pytest.mark.slow
def test_sweep_end_to_end_skips_finished_points_and_resumes_an_interrupted_one(tmp_path, capsys):
    run_dir = tmp_path / "sw"
    # Two points in parallel subprocesses.
    status = cli_main([*_tiny_sweep_args(run_dir), "--workers=2"])
    assert status == {"dpo/beta=0.1/seed0": "done", "dpo/beta=0.5/seed0": "done"}
    for beta in ("0.1", "0.5"):
        point = run_dir / f"points/dpo/beta={beta}/seed0"
        evaluation = json.loads((point / "eval.json").read_text())
        assert set(evaluation["policies"]) == {"sft", "dpo"}  # the base's SFT export, given, and the point's policy
        assert evaluation["policies"]["sft"]["kl_to_ref"] == 0.0
        assert evaluation["settings"]["reference"] == str(run_dir / "base/sft/hf")
        assert yaml.safe_load((point / "dpo/config.yaml").read_text())["model"]["init_args"]["beta"] == float(beta)
        assert not (point / "sft").exists()  # nothing but its stage trained there
    assert json.loads((run_dir / "base/eval.json").read_text())["policies"].keys() == {"sft"}
    bon = json.loads((run_dir / "best_of_n.json").read_text())
    assert [p["n"] for p in bon["points"]] == [1, 2, 4]
    report = (run_dir / "frontier.md").read_text()
    assert "beta=0.1" in report and "beta=0.5" in report
    state = json.loads((run_dir / "sweep_state.json").read_text())
    assert state["workers"] == 2 and set(state["seconds"]) == {"base", "points", "best_of_n", "total"}

    # Again: everything is done, nothing runs.
    capsys.readouterr()
    status = cli_main(_tiny_sweep_args(run_dir))
    out = capsys.readouterr().out
    assert set(status.values()) == {"skipped (done)"}
    assert "2 points, 2 done, 0 to run" in out and "sweep point" not in out

    # An interrupted point (its checkpoint kept, no export or evaluation yet) continues from last.ckpt.
    point = run_dir / "points/dpo/beta=0.5/seed0"
    (point / "eval.json").unlink()
    for f in (point / "dpo/hf").iterdir():
        f.unlink()
    (point / "dpo/hf").rmdir()
    status = cli_main(_tiny_sweep_args(run_dir))
    out = capsys.readouterr().out
    assert status == {"dpo/beta=0.1/seed0": "skipped (done)", "dpo/beta=0.5/seed0": "done"}
    assert f"resuming dpo from {point / 'dpo/checkpoints/last.ckpt'}" in out
    assert (point / "eval.json").exists()


def test_validation_parses_without_building_or_reseeding(monkeypatch):
    import torch

    from rlhf_lightning.trainer_cli import parse_only

    cfg = yaml.safe_load((ROOT / "configs/dpo.yaml").read_text())
    cfg["seed_everything"] = 7
    cfg["inputs"]["sft"] = "/nonexistent/export"  # nothing is loaded, so this is fine here
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    parsed = parse_only(cfg)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    assert "PL_GLOBAL_SEED" not in os.environ
    assert parsed["data"]["init_args"]["seed"] == 7 and parsed["model"]["init_args"]["model"] == "/nonexistent/export"
