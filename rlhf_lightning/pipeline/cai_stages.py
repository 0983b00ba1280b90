"""The Constitutional-AI data stages of the pipeline: ``cai_revise`` (SL-CAI) and ``cai_label`` (AI feedback).

Like a training stage, each takes its settings from a YAML (the stage spec's ``config``; the
same keys as the ``cai-revise`` / ``cai-label`` commands' config files) with the spec's dotted
``overrides`` on top, reads its inputs by name and writes under ``<run_dir>/<stage>``; the
settings it ran with are kept in ``<run_dir>/<stage>/config.yaml``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from rlhf_lightning.pipeline.stages import Stage

if TYPE_CHECKING:
    from rlhf_lightning.pipeline.runner import Pipeline


def stage_settings(p: Pipeline, stage: Stage) -> dict[str, Any]:
    """The stage's settings: its spec's ``config`` file (if any) with the spec's ``overrides``."""
    from rlhf_lightning.pipeline.runner import _set_dotted, config_path

    spec = p.stage_specs.get(stage.name) or {}
    cfg = yaml.safe_load(config_path(spec["config"]).read_text()) if spec.get("config") else {}
    for key, value in (spec.get("overrides") or {}).items():
        _set_dotted(cfg, key, value)
    cfg.setdefault("seed", p.cfg["seed"])
    if "constitution" not in cfg:
        raise ValueError(f"stage {stage.name!r}: its settings name no constitution file (key 'constitution')")
    return cfg


def run_cai_stage(p: Pipeline, stage: Stage) -> None:
    from rlhf_lightning.cai.commands import label_settings, revise_settings
    from rlhf_lightning.cai.label import run_label
    from rlhf_lightning.cai.revise import run_revise
    from rlhf_lightning.pipeline.runner import config_path

    cfg = stage_settings(p, stage)
    inputs = p.resolve_inputs(stage)
    out_dir = p.run_dir / stage.name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "inputs": inputs}, sort_keys=False))
    constitution = str(config_path(cfg.pop("constitution")))
    if stage.name == "cai_revise":
        run_revise(inputs["sft"], inputs["prompts_file"], constitution, str(out_dir), revise_settings(cfg))
    elif stage.name == "cai_label":
        settings = label_settings(cfg)
        run_label(
            inputs["sl_cai"],
            inputs["sft"],
            inputs["prompts_file"],
            constitution,
            str(out_dir),
            settings,
            gold_reward=inputs.get("gold_reward"),
        )
    else:
        raise ValueError(f"no Constitutional-AI step named {stage.name!r}")
