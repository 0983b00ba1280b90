"""Training-time evaluation of any policy system: gold reward, proxy reward, KL, length, EOS rate."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

from rlhf_lightning.eval.metrics import training_eval_metrics
from rlhf_lightning.eval.sampling import (
    check_same_vocab,
    load_frozen_lm,
    load_frozen_reward_model,
    sample_and_score,
    to_device,
)
from rlhf_lightning.importing import import_callable
from rlhf_lightning.models import AdapterDisabled

log = logging.getLogger(__name__)


def logprob_temperature(pl_module: L.LightningModule) -> float:
    """The temperature a system computes log-probs at: its own setting, else the sampling temperature."""
    t = getattr(pl_module, "logprob_temperature", None)
    if t is None:
        t = (getattr(pl_module, "hparams", None) or {}).get("logprob_temperature")
    return t or pl_module.sampling.temperature


class GoldRewardEval(L.Callback):
    """Every ``every_n_steps`` steps, sample held-out prompts from the policy and log ``eval/*``.

    Works with any system that has ``policy``, ``tokenizer`` and ``sampling`` (a
    ``SamplingConfig``): SFT, DPO and its relatives, PPO and the other online-RL systems.
    Logged through ``trainer.loggers`` at ``trainer.global_step``:

    * ``eval/gold_reward``: when ``gold_reward`` names a ``module:function(prompt, response)
      -> float`` (the demo task's is ``rlhf_lightning.data.demo:gold_reward``);
    * ``eval/proxy_reward``: the system's frozen ``reward_model``, else one loaded from the
      ``reward_model`` export; left out when there is neither (DPO without the argument);
    * ``eval/kl``: Monte-Carlo KL to the system's frozen ``ref_policy``, else to one loaded
      from the ``reference`` export (DPO with ``precompute_ref_logps`` frees its own;
      reference-free losses have none); left out when there is neither;
    * ``eval/response_length`` and ``eval/eos_rate``;
    * ``<stage>/iteration`` (``ppo/iteration`` unless the system names its ``stage``) for
      systems that count iterations.

    Log-probs are taken at the system's ``logprob_temperature`` when it has one, else at
    the sampling temperature. Models loaded here stay on the callback, out of the system's
    checkpoints, and are loaded once.

    Args:
        gold_reward: the gold reward's import path (None: no gold reward).
        every_n_steps: period in the system's ``iteration`` count when it has one (online RL),
            else in ``trainer.global_step``; 0 evaluates only at the start and the end.
        max_batches: evaluate on at most this many prompt batches.
        at_start: evaluate once before the first update (not on a resumed run).
        prompts_file: held-out prompts (``{"prompt"}`` / ``{"messages"}`` records); default
            the DataModule's ``eval_dataloader()``.
        max_prompt_length: prompts of ``prompts_file`` are truncated from the left to it.
        batch_size: prompts per sampling batch for ``prompts_file``.
        reference: export of the KL reference, used when the system holds none in memory.
        reward_model: reward-model export, used when the system holds none in memory.
    """

    def __init__(
        self,
        gold_reward: str | None = None,
        every_n_steps: int = 10,
        max_batches: int | None = None,
        at_start: bool = True,
        prompts_file: str | None = None,
        max_prompt_length: int = 128,
        batch_size: int = 8,
        reference: str | None = None,
        reward_model: str | None = None,
    ):
        self.gold_reward = gold_reward
        self.every_n_steps = every_n_steps
        self.max_batches = max_batches
        self.at_start = at_start
        self.prompts_file = prompts_file
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.reference = reference
        self.reward_model = reward_model
        self._gold = import_callable(gold_reward) if gold_reward else None
        self._loaded: dict[str, nn.Module] = {}  # models this callback loaded itself
        self._prompt_batches: list[dict[str, Any]] | None = None
        self._last_step: int | None = None

    # ----------------------------------------------------------------------------- what to evaluate with
    @staticmethod
    def step(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The count ``every_n_steps`` refers to: the system's iterations, else optimizer steps."""
        return int(pl_module.iteration) if hasattr(pl_module, "iteration") else trainer.global_step

    def _frozen(self, pl_module: L.LightningModule, attr: str, path: str | None) -> nn.Module | None:
        """The system's frozen model ``attr``, else the one loaded (once) from ``path``, else None."""
        model = getattr(pl_module, attr, None)
        if isinstance(model, nn.Module):
            return model
        if path is None:
            return None
        if attr not in self._loaded:
            check_same_vocab(pl_module.tokenizer, path, attr)
            if attr == "ref_policy":
                self._loaded[attr] = load_frozen_lm(path, pl_module.tokenizer)
            else:
                self._loaded[attr] = load_frozen_reward_model(path)
            log.info("GoldRewardEval: loaded %s from %s", attr, path)
        return self._loaded[attr].to(pl_module.device)

    def prompt_batches(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterable[dict[str, Any]]:
        """Left-padded prompt batches: ``prompts_file`` (tokenised once), else the DataModule's."""
        if self.prompts_file is None:
            loader = getattr(trainer.datamodule, "eval_dataloader", lambda: None)()
            if loader is None:
                raise ValueError(
                    "GoldRewardEval has no prompts: set its prompts_file, or use a DataModule "
                    "with an eval_dataloader() (PromptDataModule with eval_file)"
                )
            return loader
        if self._prompt_batches is None:
            from rlhf_lightning.data.collate import PromptCollator, tokenize_prompt
            from rlhf_lightning.data.records import load_examples

            tok = pl_module.tokenizer
            examples = load_examples(self.prompts_file, "prompt", tokenizer=tok)
            features = [tokenize_prompt(ex, tok, self.max_prompt_length) for ex in examples]
            collate = PromptCollator(tok.pad_token_id)
            self._prompt_batches = [
                collate(features[i : i + self.batch_size]) for i in range(0, len(features), self.batch_size)
            ]
        return self._prompt_batches

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample and score the prompt batches; return the ``eval/*`` means of this rank."""
        for attr in ("policy", "tokenizer", "sampling"):
            if getattr(pl_module, attr, None) is None:
                raise TypeError(f"GoldRewardEval needs a policy system; {type(pl_module).__name__} has no {attr}")
        if getattr(pl_module, "reference_is_base", False):  # a LoRA policy's reference: its adapter off
            reference = AdapterDisabled(pl_module.policy)
        else:
            reference = self._frozen(pl_module, "ref_policy", self.reference)
        reward_model = self._frozen(pl_module, "reward_model", self.reward_model)
        temperature = logprob_temperature(pl_module)
        records: list[dict[str, Any]] = []
        for i, batch in enumerate(self.prompt_batches(trainer, pl_module)):
            if self.max_batches is not None and i >= self.max_batches:
                break
            records += sample_and_score(
                pl_module.policy,
                reference,
                reward_model,
                pl_module.tokenizer,
                to_device(batch, pl_module.device),
                pl_module.sampling,
                temperature,
            )
        if self._gold is not None:
            for r in records:
                r["gold"] = float(self._gold(r["prompt"], r["response"]))
        return training_eval_metrics(records)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self.evaluate(trainer, pl_module)
        metrics = {
            k: trainer.strategy.reduce(torch.tensor(v, device=pl_module.device), reduce_op="mean").item()
            for k, v in metrics.items()
        }
        logged = dict(metrics)
        if hasattr(pl_module, "iteration"):
            stage = getattr(pl_module, "stage", None)
            logged[f"{stage if isinstance(stage, str) else 'ppo'}/iteration"] = float(pl_module.iteration)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        self._last_step = self.step(trainer, pl_module)
        log.info("step %d: %s", trainer.global_step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    # ----------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and self.step(trainer, pl_module) == 0:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Not twice at one step: PPO batches that only collect rollouts, or gradient
        # accumulation, end several batches at the same count.
        step = self.step(trainer, pl_module)
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_steps or self.step(trainer, pl_module) % self.every_n_steps:
            self._run(trainer, pl_module)
