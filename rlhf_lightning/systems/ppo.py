"""PPO against a frozen reward model (Ziegler et al. 2019; Ouyang et al. 2022), with every known detail.

The online-RL system with its defaults: a critic (a separate model started from the
reward model, or a value head on the policy), GAE over per-token KL-penalised rewards,
advantage whitening, the adaptive KL controller, one sample per prompt. See
``systems/online_rl.py`` for the iteration and ``configs/ppo.yaml`` for the settings.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_lightning.generation import SamplingConfig, decode_responses, sample_responses
from rlhf_lightning.rl.rollout import Rollout
from rlhf_lightning.systems.online_rl import OnlineRLModule


class PPOModule(OnlineRLModule):
    """PPO for a causal-LM policy; frozen reference and reward model, separate or shared critic."""

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], sampling: SamplingConfig | None = None) -> dict[str, Any]:
        """Sample held-out prompts and measure proxy score, KL to the reference, length and EOS."""
        gen = sample_responses(self.policy, batch["input_ids"], batch["attention_mask"], self.tokenizer.eos_token_id,
                               self.tokenizer.pad_token_id, sampling or self.sampling)
        r = Rollout(batch["input_ids"], batch["attention_mask"], gen.response_ids, gen.response_mask)
        was_training = self.policy.training
        self.policy.eval()
        logp = self.engine.policy_outputs(r)[0].logprobs
        self.policy.train(was_training)
        ref_logp = self.engine.ref_logprobs(r)
        kl = ((logp - ref_logp) * r.response_mask).sum(-1)  # (B,) Monte-Carlo sequence KL
        return {
            "prompts": list(batch["prompts"]),
            "responses": decode_responses(self.tokenizer, gen),
            "proxy": self.reward_model(*r.sequences()).float().tolist(),
            "kl": kl.tolist(),
            "length": gen.lengths.float().tolist(),
            "ended": gen.ended.tolist(),
        }
