"""GoldRewardEval with any policy system: DPO (reference in memory, freed, or loaded by the callback) and PPO."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from rlhf_lightning.dpo import DPOModule
from rlhf_lightning.ppo import PPOModule

from rlhf_lightning.data.datamodules import PreferenceDataModule, PromptDataModule
from rlhf_lightning.eval import GoldRewardEval
from rlhf_lightning.generation import SamplingConfig
from tests.conftest import quiet_trainer

DEMO_GOLD = "rlhf_lightning.data.demo:gold_reward"


class Keep(Logger):
    """A logger that keeps every ``log_metrics`` call as ``(step, metrics)``."""

    name, version = "keep", 0

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


def evals(logger: Keep) -> list[tuple[int, dict[str, float]]]:
    return [(s, m) for s, m in logger.rows if any(k.startswith("eval/") for k in m)]


def paths(ws) -> dict[str, str]:
    return {
        "sft": str(ws / "runs/demo/sft/hf"),
        "rm": str(ws / "runs/demo/reward/hf"),
        "tok": str(ws / "data/demo/tokenizer"),
        "prompts": str(ws / "data/demo/prompts_heldout.jsonl"),
        "train": str(ws / "data/demo/preferences_train.jsonl"),
        "val": str(ws / "data/demo/preferences_val.jsonl"),
    }


def dpo_run(ws, tmp_path, callback: GoldRewardEval, **kw):
    p = paths(ws)
    L.seed_everything(0)
    module = DPOModule(model=p["sft"], tokenizer=p["tok"], sampling=SamplingConfig(max_new_tokens=6), **kw)
    dm = PreferenceDataModule(
        tokenizer=p["tok"],
        train_file=p["train"],
        val_file=p["val"],
        batch_size=4,
        max_prompt_length=32,
        max_response_length=32,
    )
    logger = Keep()
    trainer = quiet_trainer(tmp_path, max_steps=2, logger=logger, callbacks=[callback], accumulate_grad_batches=2)
    trainer.fit(module, datamodule=dm)
    return module, trainer, logger


def test_dpo_with_its_reference_logs_kl_and_gold(demo_workspace, tmp_path):
    p = paths(demo_workspace)
    cb = GoldRewardEval(gold_reward=DEMO_GOLD, every_n_steps=1, max_batches=1, prompts_file=p["prompts"], batch_size=4)
    sgd = functools.partial(torch.optim.SGD, lr=0.5)  # big steps: the KL must move off 0
    module, _, logger = dpo_run(demo_workspace, tmp_path, cb, optimizer=sgd)
    rows = evals(logger)
    # At the start, then at optimizer steps 1 and 2: two batches per step (gradient accumulation)
    # end at each step count, and the step is evaluated once; the end of training adds none.
    assert [s for s, _ in rows] == [0, 1, 2]
    for _, m in rows:
        assert set(m) == {"eval/kl", "eval/gold_reward", "eval/response_length", "eval/eos_rate"}  # no RM, no iteration
        assert -1.0 <= m["eval/gold_reward"] <= 1.0 and 0.0 <= m["eval/eos_rate"] <= 1.0
    # Before any update the policy equals its reference (two copies of one export): KL 0.
    assert rows[0][1]["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1][1]["eval/kl"] != 0.0
    assert module.policy.training  # the mode is restored after scoring
    assert not cb._loaded  # the system's own reference was used


def test_dpo_without_reference_in_memory_loads_it(demo_workspace, tmp_path):
    p = paths(demo_workspace)
    cb = GoldRewardEval(
        gold_reward=DEMO_GOLD,
        every_n_steps=0,
        max_batches=1,
        prompts_file=p["prompts"],
        batch_size=4,
        reference=p["sft"],
        reward_model=p["rm"],
    )
    module, trainer, logger = dpo_run(demo_workspace, tmp_path, cb, precompute_ref_logps=True)
    assert module.ref_policy is None  # freed once its log-probs were cached
    rows = evals(logger)
    assert [s for s, _ in rows] == [0, 2]  # every_n_steps=0: the start and the end only
    assert {"eval/kl", "eval/proxy_reward", "eval/gold_reward"} <= set(rows[0][1])
    assert rows[0][1]["eval/kl"] == pytest.approx(0.0, abs=1e-6)  # the loaded reference is the start policy
    # Loaded once, kept on the callback: not a submodule of the system, not in its checkpoints.
    assert set(cb._loaded) == {"ref_policy", "reward_model"}
    assert not any(k.startswith(("ref_policy.", "reward_model.")) for k in module.state_dict())
    # Without the exports there is nothing to measure KL or proxy reward against.
    bare = GoldRewardEval(max_batches=1, prompts_file=p["prompts"], batch_size=4)
    assert set(bare.evaluate(trainer, module)) == {"eval/response_length", "eval/eos_rate"}


def test_ppo_counts_iterations_and_logs_ppo_iteration(demo_workspace, tmp_path):
    p = paths(demo_workspace)
    L.seed_everything(0)
    module = PPOModule(
        model=p["sft"],
        reward_model=p["rm"],
        tokenizer=p["tok"],
        sampling=SamplingConfig(max_new_tokens=6),
        ppo_epochs=1,
    )
    dm = PromptDataModule(
        tokenizer=p["tok"],
        train_file=p["prompts"],
        val_fraction=0.0,
        batch_size=4,
        max_prompt_length=32,
        eval_file=p["prompts"],
        val_batch_size=4,
    )
    logger = Keep()
    cb = GoldRewardEval(gold_reward=DEMO_GOLD, every_n_steps=2, max_batches=1)  # prompts: dm.eval_dataloader()
    quiet_trainer(tmp_path, max_steps=3, logger=logger, callbacks=[cb]).fit(module, datamodule=dm)
    rows = evals(logger)
    # Iterations 0 (start), 2 (periodic) and 3 (the end, not a multiple of 2).
    assert [m["ppo/iteration"] for _, m in rows] == [0.0, 2.0, 3.0]
    assert {"eval/kl", "eval/proxy_reward", "eval/gold_reward", "eval/response_length", "eval/eos_rate"} <= set(
        rows[0][1]
    )
    assert rows[0][1]["eval/kl"] == 0.0  # the policy starts as its reference


def test_a_system_without_a_policy_is_refused(tmp_path):
    with pytest.raises(TypeError, match="policy system"):
        GoldRewardEval().evaluate(quiet_trainer(tmp_path), L.LightningModule())
