"""Run SFT or GRPO under FSDP2 (ModelParallelStrategy) on 2 CPU processes and record each rank (tests/test_fsdp2.py).

    python tests/scripts/fsdp2_stage.py {sft,grpo} MODEL_OR_EMPTY TOKENIZER DATA OUT_DIR {fsdp2,ddp}

Lightning's launcher starts the second rank by running this file again. Each rank writes
``OUT_DIR/rank{r}.json``: its losses, how its policy is sharded, a checksum of the full
(gathered) weights before and after training, and whether sampling with the sharded
policy, rank-dependent lengths included, gives exactly what the gathered plain copy gives.
The export goes to ``OUT_DIR/hf`` (``HFExport``) and rank 0 saves the trained weights to
``OUT_DIR/weights.pt``; with ``ddp`` the same run under DDP gives the weights to compare with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from rlhf_lightning.callbacks import HFExport
from rlhf_lightning.data.datamodules import PromptDataModule, SFTDataModule
from rlhf_lightning.generation import SamplingConfig, sample_responses
from rlhf_lightning.models import gathered_copy
from rlhf_lightning.rl.rewards import RewardFunctionSpec
from rlhf_lightning.systems.online_rl import OnlineRLModule
from rlhf_lightning.systems.sft import SFTModule

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip


def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


def checksum(policy: torch.nn.Module) -> float:
    """Sum of the full weights, gathered on every rank (a collective)."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    return sum(float(v.double().sum()) for v in full.values())


class Record(L.Callback):
    """Each step's loss as this rank computed it, and the weights before training."""

    def __init__(self, key: str):
        self.key, self.losses, self.before = key, [], None

    def on_train_start(self, trainer, pl_module):
        self.before = checksum(pl_module.policy)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics[self.key]))


def system(stage: str, model: str, tokenizer: str, data: str):
    if stage == "sft":
        dm = SFTDataModule(tokenizer=tokenizer, train_file=data, val_fraction=0.0, batch_size=4)
        return SFTModule(model_config=TINY, tokenizer=tokenizer), dm, "sft/loss"
    module = OnlineRLModule(
        model=model,
        tokenizer=tokenizer,
        reward_functions=[RewardFunctionSpec(f"{__name__}:length_reward")],
        stage="grpo",
        estimator="grpo",
        num_samples=4,
        kl_in_loss=True,
        kl_estimator="k3",
        init_kl_coef=0.04,
        kl_target=None,
        whiten_advantages=False,
        ppo_epochs=2,  # two updates per rollout: the rollout forward, then learning forwards and backwards
        missing_eos_penalty=None,
        sampling=SamplingConfig(max_new_tokens=6),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    dm = PromptDataModule(tokenizer=tokenizer, train_file=data, val_fraction=0.0, batch_size=2, max_prompt_length=16)
    return module, dm, "grpo/policy_loss"


def sampling_matches(module, rank: int) -> bool:
    """Sample with the sharded policy (ranks ask for different lengths, so they run different
    numbers of forwards) and with the gathered plain copy on rank 0, from the same seed."""
    tok = module.tokenizer
    batch = tok(["The movie was", "I hated this"], return_tensors="pt", padding=True, padding_side="left")
    cfg = SamplingConfig(max_new_tokens=3 + 5 * rank)
    torch.manual_seed(123)
    sharded = sample_responses(module.policy, batch["input_ids"], batch["attention_mask"], tok.eos_token_id,
                               tok.pad_token_id, cfg)  # fmt: skip
    plain = gathered_copy(module.policy)
    if plain is None:
        return True
    torch.manual_seed(123)
    ref = sample_responses(plain, batch["input_ids"], batch["attention_mask"], tok.eos_token_id, tok.pad_token_id, cfg)
    return torch.equal(sharded.response_ids, ref.response_ids)


def main(stage: str, model: str, tokenizer: str, data: str, out_dir: str, strategy: str) -> None:
    L.seed_everything(0)
    module, dm, key = system(stage, model, tokenizer, data)
    record = Record(key)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp",
        max_steps=4,  # GRPO: two iterations of two updates
        callbacks=[record, HFExport(str(Path(out_dir, "hf")))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out_dir,
    )
    trainer.fit(module, datamodule=dm)
    weights = [p for p in module.policy.parameters()]
    out = {
        "world_size": trainer.world_size,
        "losses": record.losses,
        "sharded": all(isinstance(p, DTensor) for p in weights),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in weights),
        "full_numel": sum(p.numel() for p in weights),
        "before": record.before,
        "after": checksum(module.policy),
        "sampling_matches": sampling_matches(module, trainer.global_rank),
    }
    full = get_model_state_dict(module.policy, options=StateDictOptions(full_state_dict=True))  # every rank
    if trainer.global_rank == 0:  # the export holds the gathered weights, exactly
        torch.save(full, Path(out_dir, "weights.pt"))
        exported = AutoModelForCausalLM.from_pretrained(str(Path(out_dir, "hf"))).state_dict()
        out["export_equal"] = sorted(full) == sorted(exported) and all(torch.equal(full[k], exported[k]) for k in full)
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:7])
