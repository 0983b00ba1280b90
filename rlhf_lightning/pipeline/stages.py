"""The registry of pipeline stages: what each one reads and what it writes.

A stage reads *inputs* by name and a training stage writes one export,
``<run_dir>/<stage>/hf``, which later stages read under the stage's name. The names:

* data (written by the ``data`` stage or given by the user): ``tokenizer``, ``sft_file``,
  ``preference_train_file``, ``preference_val_file``, ``prompts_file``,
  ``heldout_prompts_file``;
* exports: the name of the training stage that writes them (``sft``, ``reward``, ...);
* settings: ``gold_reward`` (``module:function`` or None);
* files written by a non-training stage, named in its ``outputs`` (e.g. ``cai_sft_file``).

A pipeline config can also run a variant of a training stage under a new name
(``stages: {grpo_gold: {like: grpo, overrides: {...}}}``, see :func:`derive_stage`), and
feed a stage's input from another name (``stages: {ppo: {inputs: {sft: sl_cai}}}``: PPO
starts from, and is held near, the ``sl_cai`` export).

A training stage's YAML lists the same names in its ``inputs`` block; the runner sets
``inputs.<name>`` for each name the stage consumes and ``trainer.default_root_dir`` to
the stage's directory, and nothing else. Adding a stage is one :func:`register_stage`
call plus its config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_lightning.pipeline.runner import Pipeline

DATA_INPUTS = (
    "tokenizer",
    "sft_file",
    "preference_train_file",
    "preference_val_file",
    "prompts_file",
    "heldout_prompts_file",
)
SETTINGS = ("gold_reward",)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    Attributes:
        name: the stage's name (its directory under the run directory, its export's name).
        consumes: the inputs it reads (see the module docstring).
        config: for a training stage, its YAML in ``configs/`` (a ``fit`` run that writes
            the export ``<run_dir>/<name>/hf``); None for the others.
        run: for the other stages, ``run(pipeline)`` does the work.
        done: for the other stages, ``done(pipeline)`` says whether its output exists.
        policy: its export is a policy that the evaluation compares.
        outputs: for the other stages, files they write that later stages consume, as
            ``{input name: path under <run_dir>/<name>}``.
        opt_in: runs only when the pipeline config's ``stages`` names it (Constitutional AI).
    """

    name: str
    consumes: tuple[str, ...] = ()
    config: str | None = None
    run: Callable[[Pipeline], None] | None = None
    done: Callable[[Pipeline], bool] | None = None
    policy: bool = False
    outputs: dict[str, str] = field(default_factory=dict)
    opt_in: bool = False

    @property
    def trains(self) -> bool:
        return self.config is not None

    def __post_init__(self) -> None:
        if (self.config is None) == (self.run is None):
            raise ValueError(f"stage {self.name!r}: give a config (training stage) or a run function, not both")


STAGES: dict[str, Stage] = {}


def derive_stage(name: str, like: str, config: str | None = None) -> Stage:
    """A variant of a registered training stage under a new name (same inputs, its own directory
    and export), e.g. GRPO scored by a reward function beside GRPO scored by the reward model."""
    if like not in STAGES or not STAGES[like].trains:
        raise ValueError(f"stage {name!r}: 'like: {like}' must name a training stage of {list(STAGES)}")
    base = STAGES[like]
    stage = Stage(name, consumes=base.consumes, config=config or base.config, policy=base.policy)
    if STAGES.get(name) == stage:  # the same variant again (a second pipeline run in one process)
        return stage
    return register_stage(stage, before="evaluate")


def register_stage(stage: Stage, before: str | None = None) -> Stage:
    """Add ``stage`` to the registry; stages run in registration order, or just ``before`` another."""
    if stage.name in STAGES:
        raise ValueError(f"a stage named {stage.name!r} is already registered")
    if before is None:
        STAGES[stage.name] = stage
        return stage
    items = list(STAGES.items())
    at = [name for name, _ in items].index(before)
    STAGES.clear()
    STAGES.update(items[:at] + [(stage.name, stage)] + items[at:])
    return stage


def _data_done(p: Pipeline) -> bool:
    return all(p.path_exists(p.inputs[name]) for name in DATA_INPUTS if p.inputs.get(name))


def _run_data(p: Pipeline) -> None:
    p.make_data()


def _run_evaluate(p: Pipeline) -> None:
    p.evaluate()


def _run_report(p: Pipeline) -> None:
    p.report()


register_stage(Stage("data", run=_run_data, done=_data_done))
register_stage(Stage("sft", consumes=("tokenizer", "sft_file"), config="sft.yaml", policy=True))
register_stage(
    Stage(
        "reward",
        consumes=("tokenizer", "sft", "preference_train_file", "preference_val_file", "sft_file"),
        config="reward.yaml",
    )
)
register_stage(
    Stage(
        "ppo",
        consumes=("tokenizer", "sft", "reward", "prompts_file", "heldout_prompts_file", "gold_reward"),
        config="ppo.yaml",
        policy=True,
    )
)
register_stage(
    Stage(
        "dpo",
        consumes=(
            "tokenizer",
            "sft",
            "preference_train_file",
            "preference_val_file",
            "heldout_prompts_file",
            "gold_reward",
        ),
        config="dpo.yaml",
        policy=True,
    )
)
# Constitutional AI (opt-in; configs/cai.yaml): SL-CAI revisions, SFT on them, AI-feedback pairs.
# The CAI pipeline then wires the ordinary reward and PPO/GRPO stages to these outputs by name.


def _cai_stage(name: str, consumes: tuple[str, ...], outputs: dict[str, str]) -> Stage:
    def run(p: Pipeline) -> None:
        from rlhf_lightning.pipeline.cai_stages import run_cai_stage

        run_cai_stage(p, STAGES[name])

    def done(p: Pipeline) -> bool:
        return all((p.run_dir / name / rel).exists() for rel in [*outputs.values(), "stats.json"])

    return Stage(name, consumes=consumes, run=run, done=done, outputs=outputs, opt_in=True)


CAI_REVISE_OUTPUTS = {"cai_sft_file": "sft.jsonl", "cai_revision_pairs_file": "preferences.jsonl"}
CAI_LABEL_OUTPUTS = {
    "cai_preference_train_file": "preferences_train.jsonl",
    "cai_preference_val_file": "preferences_val.jsonl",
    "cai_samples_file": "samples.jsonl",
}
register_stage(_cai_stage("cai_revise", ("sft", "prompts_file"), CAI_REVISE_OUTPUTS), before="reward")
register_stage(
    Stage("sl_cai", consumes=("tokenizer", "sft", "cai_sft_file"), config="sl_cai.yaml", policy=True, opt_in=True),
    before="reward",
)
register_stage(
    _cai_stage("cai_label", ("sl_cai", "sft", "prompts_file", "gold_reward"), CAI_LABEL_OUTPUTS), before="reward"
)
# Critic-free online RL: the same inputs as PPO (the reward model, or only reward functions).
for _name in ("grpo", "rloo", "reinforce_pp"):
    register_stage(Stage(_name, consumes=STAGES["ppo"].consumes, config=f"{_name}.yaml", policy=True))
# Evaluation reads every policy export there is, the SFT export as reference, the reward export if any.
register_stage(
    Stage(
        "evaluate",
        consumes=("sft", "heldout_prompts_file", "gold_reward"),
        run=_run_evaluate,
        done=lambda p: (p.run_dir / "eval.json").exists(),
    )
)
register_stage(Stage("report", run=_run_report, done=lambda p: False))  # cheap: always rewritten
