"""The pipeline: a registry of stages (``stages.py``) and the runner that wires their exports (``runner.py``)."""

from rlhf_lightning.pipeline.runner import Pipeline, build_parser, config_path, main
from rlhf_lightning.pipeline.stages import DATA_INPUTS, STAGES, Stage, derive_stage, register_stage

__all__ = [
    "DATA_INPUTS",
    "STAGES",
    "Pipeline",
    "Stage",
    "build_parser",
    "config_path",
    "derive_stage",
    "main",
    "register_stage",
]
