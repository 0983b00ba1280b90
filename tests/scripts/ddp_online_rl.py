"""Run an online-RL stage under 2-process CPU DDP and write what each rank saw (tests/test_ddp.py).

    python tests/scripts/ddp_online_rl.py SFT_EXPORT TOKENIZER PROMPTS OUT_DIR ESTIMATOR

Lightning's DDP launcher starts the second rank by running this file again. Each rank
writes ``OUT_DIR/rank{r}.json``: the prompts and group ids of every rollout, the
advantages (masked, flattened), and a checksum of its policy's weights after training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from rlhf_lightning.data.datamodules import PromptDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.rl.rewards import RewardFunctionSpec
from rlhf_lightning.systems.online_rl import OnlineRLModule


def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


class Recording(OnlineRLModule):
    """Keeps what the rank collected and the advantages it computed."""

    seen: list[dict]

    def collect_rollout(self, batch, old_outputs=True):
        r, stats = super().collect_rollout(batch, old_outputs)
        self.seen.append({"prompts": list(r.prompts), "group_ids": r.group_ids.tolist()})
        return r, stats

    def compute_advantages(self, r):
        stats = super().compute_advantages(r)
        self.seen[-1]["advantages"] = r.advantages[r.response_mask.bool()].tolist()
        return stats


def main(sft: str, tokenizer: str, prompts: str, out_dir: str, estimator: str) -> None:
    L.seed_everything(0)
    group = estimator != "reinforce_pp"
    module = Recording(
        model=sft,
        tokenizer=tokenizer,
        reward_functions=[RewardFunctionSpec(f"{__name__}:length_reward")],
        stage=estimator,
        estimator=estimator,
        num_samples=4 if group else 1,
        kl_in_loss=group,
        kl_estimator="k3" if group else "k1",
        init_kl_coef=0.04,
        kl_target=None,
        whiten_advantages=not group,
        ppo_epochs=1,
        missing_eos_penalty=None,
        sampling=SamplingConfig(max_new_tokens=6),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    module.seen = []
    dm = PromptDataModule(tokenizer=tokenizer, train_file=prompts, val_fraction=0.0, batch_size=2, max_prompt_length=16)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out_dir,
    )
    trainer.fit(module, datamodule=dm)
    checksum = sum(float(p.double().sum()) for p in module.policy.parameters())
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "rollouts": module.seen,
        "checksum": checksum,
    }
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:6])
