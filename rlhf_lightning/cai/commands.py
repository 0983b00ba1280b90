"""``rlhf-lightning cai-revise`` (SL-CAI data) and ``rlhf-lightning cai-label`` (AI-feedback pairs).

Both take their settings as flags or from a YAML file (``-c``), with the same keys as the
pipeline stages ``cai_revise`` and ``cai_label`` (configs/cai_revise.yaml, configs/cai_label.yaml)::

    rlhf-lightning cai-revise -c configs/cai_revise.yaml --policy runs/cai/sft/hf \\
        --prompts runs/cai/data/prompts_train.jsonl --out runs/cai/revisions
    rlhf-lightning cai-label -c configs/cai_label.yaml --policy runs/cai/sl_cai/hf \\
        --feedback_model runs/cai/sft/hf --prompts prompts.jsonl --out runs/cai/feedback
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from rlhf_lightning.cai.label import LabelSettings, run_label
from rlhf_lightning.cai.revise import ReviseSettings, run_revise
from rlhf_lightning.generation import SamplingConfig


def _settings(cls, cfg: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}")
    values = dict(cfg)
    if isinstance(values.get("sampling"), dict):
        values["sampling"] = SamplingConfig(**{"max_new_tokens": 64, **values["sampling"]})
    return cls(**values)


def revise_settings(cfg: dict[str, Any]) -> ReviseSettings:
    """:class:`ReviseSettings` from a dict (``sampling`` as a dict of :class:`SamplingConfig` fields)."""
    return _settings(ReviseSettings, cfg)


def label_settings(cfg: dict[str, Any]) -> LabelSettings:
    """:class:`LabelSettings` from a dict (``sampling`` as a dict of :class:`SamplingConfig` fields)."""
    return _settings(LabelSettings, cfg)


def _parser(prog: str, doc: str, settings_cls) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=doc)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_argument("--policy", type=str, required=True, help="the policy export (or hub name) to sample")
    parser.add_argument("--prompts", type=str, required=True, help="prompt file ({prompt} or {messages} records)")
    parser.add_argument("--constitution", type=str, required=True, help="constitution file (YAML or JSON)")
    parser.add_argument("--out", type=str, required=True, help="output folder")
    for f in fields(settings_cls):
        if f.name == "sampling":
            parser.add_argument("--sampling", type=dict[str, Any] | None, default=None, help="SamplingConfig fields")
        else:
            parser.add_argument(f"--{f.name}", type=int | float | None, default=getattr(settings_cls(), f.name))
    return parser


def _split(cfg: dict[str, Any], settings_cls) -> dict[str, Any]:
    return {f.name: cfg[f.name] for f in fields(settings_cls) if cfg.get(f.name) is not None}


def revise_main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser("rlhf-lightning cai-revise", "SL-CAI: critique and revise policy samples", ReviseSettings)
    parser.add_argument("--tokenizer", type=str | None, default=None, help="default: the policy's")
    cfg = parser.parse_args(argv).as_dict()
    stats = run_revise(
        cfg["policy"],
        cfg["prompts"],
        cfg["constitution"],
        cfg["out"],
        revise_settings(_split(cfg, ReviseSettings)),
        cfg["tokenizer"],
    )
    print(json.dumps(stats["counts"], indent=2))
    return stats


def label_main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser("rlhf-lightning cai-label", "AI feedback: soft preference labels", LabelSettings)
    parser.add_argument("--feedback_model", type=str | None, default=None, help="default: the policy")
    parser.add_argument("--gold_reward", type=str | None, default=None, help="module:function, only to measure")
    cfg = parser.parse_args(argv).as_dict()
    stats = run_label(
        cfg["policy"],
        cfg["feedback_model"] or cfg["policy"],
        cfg["prompts"],
        cfg["constitution"],
        cfg["out"],
        label_settings(_split(cfg, LabelSettings)),
        cfg["gold_reward"],
    )
    print(json.dumps({k: v for k, v in stats.items() if k != "settings"}, indent=2))
    return stats
