"""The learning phase of online RL: epochs of minibatch updates over one rollout.

Each optimizer step takes one minibatch in micro-batches; each micro-batch's loss is
weighted by its share of the minibatch's reduction denominator (response tokens for a
token mean, sequences for the per-sequence reductions), so the accumulated gradient is
the whole minibatch's whatever the micro-batch size (1x8 = 8x1). Gradients are clipped
per model (policy, critic) so one model's spike never scales the other's update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf_lightning.logprobs import masked_mean
from rlhf_lightning.rl.rollout import Rollout, RolloutBuffer

if TYPE_CHECKING:
    from rlhf_lightning.systems.online_rl import OnlineRLModule


class Learner:
    """Runs ``ppo_epochs`` of updates of an online-RL system on a rollout."""

    def __init__(self, system: OnlineRLModule):
        self.system = system
        self.update_stats: list[dict[str, torch.Tensor]] = []  # per optimizer step (the first has ratio 1)

    def batch_sizes(self, n_samples: int) -> tuple[int, int]:
        """(minibatch, micro-batch) sizes for a buffer of ``n_samples``."""
        hp = self.system.hparams
        mb = hp.minibatch_size or n_samples
        return mb, hp.micro_batch_size or mb

    def one_pass(self, n_samples: int) -> bool:
        """Whether a buffer of ``n_samples`` is one minibatch of one micro-batch."""
        return min(self.batch_sizes(n_samples)) >= n_samples

    def _share(self, part: Rollout, whole: Rollout) -> torch.Tensor | float:
        if self.system.hparams.loss_aggregation == "token_mean":
            return part.response_mask.sum() / whole.response_mask.sum().clamp_min(1)
        return part.batch_size / whole.batch_size

    def accumulate_gradients(self, mb: Rollout, micro_batch_size: int, backward=None) -> dict[str, torch.Tensor]:
        """Backward of the loss of one minibatch, in micro-batches (see the module docstring)."""
        s = self.system
        backward = backward or s.manual_backward
        stats: dict[str, torch.Tensor] = {}
        for start in range(0, mb.batch_size, micro_batch_size):
            part = mb.select(range(start, min(start + micro_batch_size, mb.batch_size)))
            out, values = s.engine.policy_outputs(part)
            loss, terms = s.loss(part, out.logprobs, values)
            weight = self._share(part, mb)
            backward(loss * weight)
            for k, v in terms.items():
                stats[k] = stats.get(k, 0.0) + v * weight
        return stats

    def _first_update_from_rollout_forward(self, r: Rollout) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Backward of the first update whose forward also supplies the rollout's log-probs and values.

        Before any update the policy and critic are the rollout-time ones, so their outputs
        here, detached, are the "old" log-probs and values; advantages are computed from them
        and the loss is taken on the same graph (ratio exactly 1, value clipping inactive).
        Returns ``(advantage stats, loss terms)``.
        """
        s = self.system
        out, values = s.engine.policy_outputs(r, with_entropy=True)
        r.logprobs = out.logprobs.detach()
        r.values = None if values is None else values.detach()
        adv_stats = s.compute_advantages(r)
        adv_stats["entropy"] = masked_mean(out.entropy, r.response_mask)
        loss, terms = s.loss(r, out.logprobs, values)
        s.manual_backward(loss)
        return adv_stats, terms

    def _clip(self) -> None:
        s = self.system
        if s.hparams.max_grad_norm is None:
            return
        for module in (s.policy, s.critic):
            if module is not None:
                params = [p for p in module.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, s.hparams.max_grad_norm)

    def learn(self, r: Rollout) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes of minibatch updates over the rollout ``r``.

        If ``r`` has no advantages yet they are computed here (their stats are returned
        too); if it also lacks the rollout-time log-probs and values, the first update's
        forward supplies them when the buffer is one minibatch of one micro-batch, and a
        separate no-grad pass does otherwise.
        """
        s = self.system
        opt, sched = s.optimizers(), s.lr_schedulers()
        mb_size, micro = self.batch_sizes(r.batch_size)
        totals: dict[str, torch.Tensor] = {}
        self.update_stats = []
        epochs = s.hparams.ppo_epochs
        stats: dict[str, torch.Tensor] = {}

        def finish_step(step_stats: dict[str, torch.Tensor]) -> None:
            for k, v in step_stats.items():
                totals[k] = totals.get(k, 0.0) + v
            self.update_stats.append(step_stats)
            self._clip()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()

        if r.logprobs is None and self.one_pass(r.batch_size) and epochs > 0:
            adv_stats, first = self._first_update_from_rollout_forward(r)
            stats.update(adv_stats)
            finish_step(first)
            epochs -= 1
        else:
            if r.logprobs is None:
                stats["entropy"] = s.fill_old_outputs(r)
            if r.advantages is None:
                stats.update(s.compute_advantages(r))
        buf = RolloutBuffer(s.tokenizer.pad_token_id)
        buf.add(r)
        for mb in buf.minibatches(mb_size, epochs=epochs, generator=s.minibatch_generator):
            finish_step(self.accumulate_gradients(mb, micro))
        n_updates = max(len(self.update_stats), 1)
        stats.update({k: v / n_updates for k, v in totals.items()})
        return stats
