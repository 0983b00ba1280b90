"""Run a stage under FSDP2 (ModelParallelStrategy) on 2 CPU processes, recording each rank (test_fsdp2.py).

    python tests/scripts/fsdp2_stage.py {sft,dpo,dpo_cached,grpo,reward_lora,ppo,ppo_lora} MODEL_OR_EMPTY \
        TOKENIZER DATA OUT_DIR {fsdp2,ddp} [PHASE]

``reward_lora`` reads SFT demonstrations for its normalisation from ``sft.jsonl`` beside DATA;
``ppo`` and ``ppo_lora`` read the reward model from ``rm`` beside MODEL. Lightning's
launcher starts the second rank by running this file again. Each rank writes
``OUT_DIR/rank{r}.json`` with its losses and rank 0 saves the trained (gathered) weights,
every trained model's under its name, to ``OUT_DIR/weights.pt``. PHASE:

* ``whole`` (default): four steps; the json also holds how the trained models are
  sharded, a checksum of their full weights before and after training, whether sampling
  with the sharded policy, rank-dependent lengths included, gives exactly what the
  gathered plain copy gives, and whether the export (``OUT_DIR/hf``, ``HFExport``) loaded
  with plain transformers gives the sharded model's outputs. With ``ddp`` the same run
  under DDP gives the weights to compare with;
* ``cut``: a checkpoint after every step, stopped by an exception as the batch after step
  ``KILL_AT`` starts (no weights saved);
* ``resume``: the ``cut`` run resumed from ``OUT_DIR/ckpt/last.ckpt`` to step four.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import rlhf_lightning.models.forward as forward
from rlhf_lightning.callbacks import HFExport
from rlhf_lightning.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from rlhf_lightning.generation import SamplingConfig, sample_responses
from rlhf_lightning.models import LoraSettings, RewardModel, gathered_copy, has_lora
from rlhf_lightning.systems.dpo import DPOModule
from rlhf_lightning.systems.reward import RewardModule, RewardNormalization
from rlhf_lightning.systems.sft import SFTModule
from tests.test_online_rl import make as make_grpo
from tests.test_ppo import make as make_ppo

KILL_AT = 2  # cut: stopped after two of the four steps (online RL: after the first iteration)
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip


def trained(module) -> dict[str, torch.nn.Module]:
    """The models the stage trains, by attribute name."""
    names = ["reward_model"] if isinstance(module, RewardModule) else ["policy", "critic"]
    return {n: getattr(module, n) for n in names if getattr(module, n, None) is not None}


def full_weights(module) -> dict[str, torch.Tensor]:
    """Every trained model's full weights as ``name.key``, gathered on every rank (a collective)."""
    options = StateDictOptions(full_state_dict=True)
    states = {n: get_model_state_dict(m, options=options) for n, m in trained(module).items()}
    return {f"{n}.{k}": v for n, state in states.items() for k, v in state.items()}


def checksum(module) -> float:
    return sum(float(v.double().sum()) for v in full_weights(module).values())


class Record(L.Callback):
    """Each step's loss as this rank computed it, and the weights before training."""

    def __init__(self, key: str):
        self.key, self.losses, self.before = key, [], None

    def on_train_start(self, trainer, pl_module):
        self.before = checksum(pl_module)
        if hasattr(pl_module, "policy"):  # a setting only the policy's generation config holds: the export keeps it
            pl_module.policy.generation_config.fsdp2_marker = "kept"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics[self.key]))


def system(stage: str, model: str, tokenizer: str, data: str):
    if stage == "sft":
        dm = SFTDataModule(tokenizer=tokenizer, train_file=data, val_fraction=0.0, batch_size=4)
        return SFTModule(model_config=TINY, tokenizer=tokenizer), dm, "sft/loss"
    if stage in ("dpo", "dpo_cached"):  # the reference: a frozen copy of the export, sharded like the policy
        dm = PreferenceDataModule(tokenizer=tokenizer, train_file=data, val_fraction=0.0, batch_size=2)
        module = DPOModule(
            model=model,
            tokenizer=tokenizer,
            optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
            precompute_ref_logps=stage == "dpo_cached",
        )
        return module, dm, "dpo/loss"
    if stage == "reward_lora":
        # The RewardModel wrapper is the FSDP2 root; LoRA on its backbone, the score head trained in
        # full (peft's modules_to_save); the normalisation scores with it on every rank.
        dm = PreferenceDataModule(tokenizer=tokenizer, train_file=data, val_fraction=0.0, batch_size=2)
        module = RewardModule(
            model=model, tokenizer=tokenizer, lora=LoraSettings(r=4, alpha=8.0),
            optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        )  # fmt: skip
        return module, dm, "rm/loss"
    dm = PromptDataModule(tokenizer=tokenizer, train_file=data, val_fraction=0.0, batch_size=2, max_prompt_length=16)
    if stage in ("ppo", "ppo_lora"):
        # Two updates per rollout, an adaptive KL coefficient. ``ppo``: a separate critic (sharded,
        # called through ``values``); ``ppo_lora``: LoRA on the policy, whose reference is then the
        # policy with its adapter off, a value head on the policy as critic, gradient clipping on.
        exports = {"sft": model, "rm": str(Path(model).with_name("rm")), "tokenizer": tokenizer}
        module = make_ppo(
            exports,
            sampling=SamplingConfig(max_new_tokens=6),
            kl_target=0.01,
            kl_horizon=10,
            ppo_epochs=2,
            lora=LoraSettings(r=4, alpha=8.0) if stage == "ppo_lora" else None,
            shared_value_head=stage == "ppo_lora",
            # Clipping sums the squared gradient norms in another order than DDP does (per shard,
            # then across ranks), which moves the weights by an ulp: left on with LoRA only.
            max_grad_norm=1.0 if stage == "ppo_lora" else None,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        )
        return module, dm, "ppo/policy_loss"
    # The critic-free test system (its length reward, the k3 KL in the loss), with an adaptive
    # coefficient that moves every iteration (a resumed run must take it up) and two updates
    # per rollout: the rollout forward, then learning forwards and backwards.
    module = make_grpo(
        {"sft": model, "tokenizer": tokenizer},
        kl_target=0.01,
        kl_horizon=10,
        ppo_epochs=2,
        loss_aggregation="token_mean",
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
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


def export_checks(module, full: dict[str, torch.Tensor], path: Path, rank: int) -> dict[str, bool]:
    """On rank 0: the export, loaded with plain transformers, holds the gathered weights exactly
    (LoRA: merged, so only its outputs are compared), gives the sharded model's outputs, and
    keeps the generation config's marker (a setting only the trained model's config holds)."""
    ids = torch.tensor([[5, 17, 42, 9, 33, 61], [7, 8, 9, 10, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    reward = isinstance(module, RewardModule)
    trained_model = module.reward_model if reward else module.policy
    trained_model.eval()
    with torch.no_grad():  # every rank: the sharded forward gathers
        if reward:
            sharded_out = trained_model(ids, mask, normalize=False)
        else:
            sharded_out = trained_model(input_ids=ids, attention_mask=mask).logits
    if rank != 0:
        return {}
    lora = has_lora(trained_model)
    prefix = "reward_model.model." if reward else "policy."
    if reward:
        plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.no_grad():
            out = RewardModel(plain)(ids, mask, normalize=False)
    else:
        plain = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            out = plain(input_ids=ids, attention_mask=mask).logits
    exported = plain.state_dict()
    ours = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    gc = {} if reward else json.loads((path / "generation_config.json").read_text())
    config = json.loads((path / "config.json").read_text())
    same = sorted(ours) == sorted(exported) and all(torch.equal(ours[k], exported[k]) for k in ours)
    return {
        "export_equal": lora or same,
        "export_outputs_match": bool(torch.allclose(out, sharded_out, rtol=0, atol=1e-5 if lora else 0)),
        "generation_config_kept": reward or gc.get("fsdp2_marker") == "kept",
        # RewardNormalization ran (a built model's gain is 1.0) and the export carries its gain.
        "normalization_exported": not reward or config.get("rlhf_reward_gain") == trained_model.gain != 1.0,
    }


class Killed(RuntimeError):
    """Stands for a SIGKILL: the run stops with nothing saved on the way out."""


class Kill(L.Callback):
    """Stop the run as the batch after optimizer step ``at_step`` starts (its checkpoint written),
    each rank's losses so far written first (rank 0's exception ends rank 1's process)."""

    def __init__(self, at_step: int, record: Record, out_dir: str):
        self.at_step, self.record, self.out_dir = at_step, record, out_dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps({"losses": self.record.losses}))
            trainer.strategy.barrier()
            raise Killed(f"killed at step {self.at_step}")


def main(stage: str, model: str, tokenizer: str, data: str, out_dir: str, strategy: str, phase: str = "whole") -> None:
    L.seed_everything(0)
    module, dm, key = system(stage, model, tokenizer, data)
    record = Record(key)
    ckpt_dir = Path(out_dir, "ckpt")
    if phase == "whole":
        callbacks = [record, HFExport(str(Path(out_dir, "hf")))]
        if stage == "reward_lora":  # before the export, as in configs/reward.yaml
            samples = str(Path(data).with_name("sft.jsonl"))
            callbacks.insert(1, RewardNormalization(samples_file=samples, max_samples=8, batch_size=4))
    else:  # a checkpoint after every step, as ``cut`` leaves it and ``resume`` starts from it
        callbacks = [record, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1, every_n_train_steps=1)]
    if phase == "cut":
        callbacks.append(Kill(KILL_AT, record, out_dir))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp",
        max_steps=4,  # GRPO: two iterations of two updates
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=phase != "whole",
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out_dir,
    )
    if phase == "cut":
        with contextlib.suppress(Killed):  # the stop the test stands for, after Kill wrote the losses
            trainer.fit(module, datamodule=dm)
        return
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_dir / "last.ckpt") if phase == "resume" else None)
    full = full_weights(module)  # every rank
    if trainer.global_rank == 0:
        torch.save(full, Path(out_dir, "weights.pt"))
    out = {"losses": record.losses}
    if phase == "whole":
        weights = [p for m in trained(module).values() for p in m.parameters()]
        out |= {
            "world_size": trainer.world_size,
            "sharded": all(isinstance(p, DTensor) for p in weights),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in weights),
            "full_numel": sum(p.numel() for p in weights),
            # The frozen reference and reward model are sharded too (none whole on every rank).
            "frozen": sorted(n for n in module._frozen if getattr(module, n, None) is not None),
            "frozen_sharded": all(
                isinstance(p, DTensor) for n in module._frozen for p in getattr(module, n).parameters()
            ),
            "before": record.before,
            "after": checksum(module),
            "sampling_matches": sampling_matches(module, trainer.global_rank) if hasattr(module, "policy") else True,
            # The policy's log-probs went through the chunked head split (not the full logits).
            "chunked": not hasattr(module, "policy") or forward._REPRODUCES.get(module.policy) is True,
            **export_checks(module, full, Path(out_dir, "hf"), trainer.global_rank),
        }
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:8])
