"""The CAI stages in the pipeline: opt-in (other pipelines unchanged), outputs as named inputs, inputs
rewired per stage (reward on AI-feedback pairs, RL-CAI from the SL-CAI export)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def registry(monkeypatch):
    """A private copy of the stage registry (derived stages do not leak into other tests)."""
    from rlhf_lightning.pipeline import stages as stages_module

    copy = dict(stages_module.STAGES)
    monkeypatch.setattr(stages_module, "STAGES", copy)
    monkeypatch.setattr("rlhf_lightning.pipeline.runner.STAGES", copy)
    return copy


def _names(monkeypatch, argv: list[str]) -> list[str]:
    from rlhf_lightning.pipeline import runner

    seen: list[str] = []
    monkeypatch.setattr(runner.Pipeline, "run", lambda self, names, resume=False: seen.extend(names))
    runner.main(argv)
    return seen


def test_cai_stages_are_opt_in(registry, monkeypatch, tmp_path):
    names = _names(monkeypatch, ["-c", str(ROOT / "configs/quickstart.yaml"), "--run_dir", str(tmp_path / "q")])
    assert names == ["data", "sft", "reward", "ppo", "dpo", "grpo", "evaluate", "report"]
    assert {"cai_revise", "sl_cai", "cai_label"} <= set(registry)
    names = _names(monkeypatch, ["-c", str(ROOT / "configs/cai.yaml"), "--run_dir", str(tmp_path / "c")])
    assert names == [
        "data",
        "sft",
        "cai_revise",
        "sl_cai",
        "cai_label",
        "reward",
        "rl_cai",
        "rl_cai_grpo",
        "evaluate",
        "report",
    ]


def test_cai_wiring(registry, tmp_path):
    from rlhf_lightning.pipeline import Pipeline, derive_stage

    cfg = yaml.safe_load((ROOT / "configs/cai.yaml").read_text())
    cfg["run_dir"] = str(tmp_path)
    for name in ("rl_cai", "rl_cai_grpo"):
        derive_stage(name, cfg["stages"][name]["like"])
    p = Pipeline(cfg)
    for stage in ("sft", "sl_cai", "reward"):
        (tmp_path / stage / "hf").mkdir(parents=True)
        (tmp_path / stage / "hf" / "config.json").write_text("{}")
    # the reward stage reads the AI-feedback pairs: an error names the stage that writes them
    with pytest.raises(FileNotFoundError, match="reads 'cai_preference_train_file', written by stage 'cai_label'"):
        p.stage_config(registry["reward"])
    for rel in (
        "cai_label/preferences_train.jsonl",
        "cai_label/preferences_val.jsonl",
        "cai_label/samples.jsonl",
        "cai_revise/sft.jsonl",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    reward = p.stage_config(registry["reward"])["inputs"]
    assert reward["preference_train_file"] == str(tmp_path / "cai_label/preferences_train.jsonl")
    assert reward["sft_file"] == str(tmp_path / "cai_label/samples.jsonl")  # normalised on policy samples
    assert reward["sft"] == str(tmp_path / "sft/hf")
    for name in ("rl_cai", "rl_cai_grpo"):
        inputs = p.stage_config(registry[name])["inputs"]
        assert inputs["sft"] == str(tmp_path / "sl_cai/hf") and inputs["reward"] == str(tmp_path / "reward/hf")
    sl_cai = p.stage_config(registry["sl_cai"])
    assert sl_cai["inputs"]["cai_sft_file"] == str(tmp_path / "cai_revise/sft.jsonl")
    assert sl_cai["model"]["init_args"]["model"] == "${inputs.sft}"
    # a wiring to an unknown name is an error naming it
    p.stage_specs["reward"]["inputs"]["sft_file"] = "no_such_input"
    with pytest.raises(ValueError, match="inputs.sft_file names 'no_such_input'"):
        p.stage_config(registry["reward"])


def test_cai_stage_settings(registry, tmp_path):
    from rlhf_lightning.cai.commands import label_settings, revise_settings
    from rlhf_lightning.pipeline import Pipeline
    from rlhf_lightning.pipeline.cai_stages import stage_settings

    cfg = yaml.safe_load((ROOT / "configs/cai.yaml").read_text())
    cfg["run_dir"] = str(tmp_path)
    cfg["stages"]["cai_revise"]["overrides"] = {"rounds": 3, "sampling.temperature": 0.7}
    p = Pipeline(cfg)
    settings = stage_settings(p, registry["cai_revise"])
    assert settings["constitution"] == "configs/constitution_demo.yaml" and settings["seed"] == 0
    settings.pop("constitution")
    revise = revise_settings(settings)
    assert revise.rounds == 3 and revise.sampling.temperature == 0.7 and revise.sampling.max_new_tokens == 64
    label = stage_settings(p, registry["cai_label"])
    label.pop("constitution")
    assert label_settings(label).samples_per_prompt == 2
    with pytest.raises(ValueError, match=r"unknown ReviseSettings key\(s\) \['roundz'\]"):
        revise_settings({"roundz": 2})
