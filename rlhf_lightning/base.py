"""What every policy-training system shares: tokenizer, policy loading, optimizers, sampling, export.

The systems (SFT, DPO, PPO) keep their own typed ``__init__`` (so ``--print_config``
shows every knob) and call these helpers; the maths stays in ``losses.py``,
``advantages.py`` and ``logprobs.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from rlhf_lightning.generation import SamplingConfig, decode_responses, sample_responses
from rlhf_lightning.models import load_causal_lm, load_tokenizer, save_hf
from rlhf_lightning.optim import build_optimization


class PolicySystem(L.LightningModule):
    """Base of the systems that train a causal-LM policy (``self.policy``)."""

    policy: torch.nn.Module | None

    def _setup_common(
        self,
        model: str | None,
        model_config: dict[str, Any] | None,
        tokenizer: str | None,
        optimizer,
        lr_scheduler,
        trust_remote_code: bool,
        sampling: SamplingConfig | None,
    ) -> None:
        if model is None and model_config is None:
            raise ValueError("set model (hub name or path) or model_config (a tiny model from scratch)")
        if tokenizer is None and model is None:
            raise ValueError("a model built from model_config needs a tokenizer path")
        self.model_name = model
        self.model_config = model_config
        self.tokenizer_name = tokenizer or model
        self.trust_remote_code = trust_remote_code
        self.optimizer_factory = optimizer if optimizer is not None else torch.optim.AdamW
        self.scheduler_factory = lr_scheduler
        self.sampling = sampling or SamplingConfig()
        self.tokenizer = load_tokenizer(self.tokenizer_name, trust_remote_code=trust_remote_code)
        self.policy = None

    def _load_policy(self) -> torch.nn.Module:
        # from_pretrained returns eval mode and Lightning keeps each module's mode, so a
        # policy loaded from an export must be put in train mode here (gradient
        # checkpointing and dropout only act in train mode).
        return load_causal_lm(
            self.model_name, self.tokenizer, self.model_config, trust_remote_code=self.trust_remote_code
        ).train()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return build_optimization(self, params, self.optimizer_factory, self.scheduler_factory)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> list[dict[str, str]]:
        """Sample responses for a batch of left-padded prompts (``PromptDataModule``)."""
        gen = sample_responses(
            self.policy,
            batch["input_ids"],
            batch["attention_mask"],
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            config=self.sampling,
        )
        texts = decode_responses(self.tokenizer, gen)
        ended = gen.ended.tolist()
        return [
            {"prompt": p, "response": r, "ended_with_eos": bool(e)}
            for p, r, e in zip(batch["prompts"], texts, ended)
        ]

    def export_hf(self, path: str | Path) -> Path:
        """``save_pretrained`` the policy and tokenizer (the hand-off to the next stage)."""
        return save_hf(self.policy, self.tokenizer, path)
