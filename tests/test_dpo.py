"""DPO system: one concatenated forward, response-only log-probs, frozen and precomputed reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from rlhf_lightning.cli import cli_main
from rlhf_lightning.data.collate import IGNORE_INDEX, PreferenceCollator, pad_right
from rlhf_lightning.data.datamodules import PreferenceDataModule
from rlhf_lightning.losses import ipo_loss, simpo_loss
from rlhf_lightning.models import freeze, load_causal_lm, save_hf
from rlhf_lightning.systems.dpo import DPOModule, sequence_logps
from tests.conftest import TINY_MODEL_CONFIG, quiet_trainer

DPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "dpo.yaml"

PAIRS = [
    ("The movie was", " great and the acting was wonderful.", " boring and bad."),
    ("I hated this film,", " the plot was boring.", " the music was lovely!"),
    ("Review:", " a fine story with a few slow scenes.", " a terrible script."),
    ("My thoughts on this movie:", " it was good.", " it was not good at all, a dull ending."),
    ("The music was", " lovely and the ending made me smile!", " weak."),
    ("A terrible script,", " weak actors and a dull ending.", " great."),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, tokenizer_dir):
    """Two tiny exports (the SFT start and a different reference) and preference files."""
    root = tmp_path_factory.mktemp("dpo")
    for name, seed in (("sft", 0), ("other", 1)):
        torch.manual_seed(seed)
        save_hf(load_causal_lm(None, tokenizer, model_config=dict(TINY_MODEL_CONFIG)), tokenizer, root / name)
    for split, pairs in (("train", PAIRS * 2), ("val", PAIRS[:3])):
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs)
        )
    return {k: str(root / k) for k in ("sft", "other")} | {
        "train": str(root / "train.jsonl"),
        "val": str(root / "val.jsonl"),
        "tokenizer": tokenizer_dir,
    }


def make_data(s, batch_size=4):
    dm = PreferenceDataModule(
        tokenizer=s["tokenizer"],
        train_file=s["train"],
        val_file=s["val"],
        batch_size=batch_size,
        max_prompt_length=16,
        max_response_length=16,
    )
    dm.setup("fit")
    return dm


def make(s, **kw):
    module = DPOModule(model=s["sft"], tokenizer=s["tokenizer"], **kw)
    module.configure_model()
    return module


def trainer(tmp_path, **kw):
    return quiet_trainer(tmp_path, **{"max_steps": 2, **kw})


class FirstLoss(L.Callback):
    def __init__(self):
        self.loss = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.loss is None:
            self.loss = outputs["loss"].item()


def naive_logps(model, ids: list[int], labels: list[int]) -> float:
    """Sum of log p(label_t) over labelled tokens of ONE unpadded sequence, by a plain loop."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    logp = logits.log_softmax(-1)
    return sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)


def test_concatenated_forward_equals_separate_and_naive(setup, tiny_lm):
    dm = make_data(setup)
    feats = dm.train_dataset[:4]
    batch = PreferenceCollator(dm.tokenizer.pad_token_id)(feats)  # (8, T) chosen then rejected
    with torch.no_grad():
        together = sequence_logps(tiny_lm, batch)  # (8,)
        parts = []
        for side in ("chosen", "rejected"):  # each side padded only to its own longest
            ids = [f[f"{side}_input_ids"] for f in feats]
            sep = {
                "input_ids": pad_right(ids, dm.tokenizer.pad_token_id),
                "attention_mask": pad_right([[1] * len(i) for i in ids], 0),
                "labels": pad_right([f[f"{side}_labels"] for f in feats], IGNORE_INDEX),
            }
            parts.append(sequence_logps(tiny_lm, sep))
        naive = [
            naive_logps(tiny_lm, f[f"{side}_input_ids"], f[f"{side}_labels"])
            for side in ("chosen", "rejected")
            for f in feats
        ]
    assert batch["input_ids"].shape[0] == 8 and (batch["attention_mask"] == 0).any()  # padding present
    torch.testing.assert_close(together, torch.cat(parts), atol=1e-5, rtol=0)
    torch.testing.assert_close(together, torch.tensor(naive), atol=1e-4, rtol=0)


def test_sequence_logps_count_only_response_tokens(setup, tiny_lm):
    dm = make_data(setup)
    batch = PreferenceCollator(dm.tokenizer.pad_token_id)(dm.train_dataset[:3])
    with torch.no_grad():
        base = sequence_logps(tiny_lm, batch)
        # (1) 5 more columns of right padding, with junk token ids under the pad: no change
        n, T = batch["input_ids"].shape
        padded = {
            "input_ids": torch.cat([batch["input_ids"], torch.randint(3, 50, (n, 5))], 1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(n, 5, dtype=torch.long)], 1),
            "labels": torch.cat([batch["labels"], torch.full((n, 5), IGNORE_INDEX)], 1),
        }
        torch.testing.assert_close(sequence_logps(tiny_lm, padded), base, atol=1e-5, rtol=0)
        # (2) junk ids in the existing padding positions: no change
        junk = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7))
        torch.testing.assert_close(sequence_logps(tiny_lm, junk), base, atol=1e-5, rtol=0)
        # (3) scoring one more (prompt) token changes the sum: the mask is what counts
        more = batch["labels"].clone()
        first = (more != IGNORE_INDEX).float().argmax(-1)  # first response position per row
        more[0, first[0] - 1] = batch["input_ids"][0, first[0] - 1]
        assert not torch.allclose(sequence_logps(tiny_lm, dict(batch, labels=more))[0], base[0])
        # (4) length-normalised = sum / number of response tokens
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        torch.testing.assert_close(sequence_logps(tiny_lm, batch, average=True), base / count, atol=1e-6, rtol=1e-6)
    assert (base < 0).all()


@pytest.mark.parametrize("source", ["export", "model_config"])
def test_step_zero_loss_is_log2_and_rewards_zero(setup, source):
    dm = make_data(setup)
    if source == "export":
        module = make(setup)
    else:
        torch.manual_seed(3)
        module = DPOModule(model_config=dict(TINY_MODEL_CONFIG), tokenizer=setup["tokenizer"])
        module.configure_model()
    batch = next(iter(dm.train_dataloader()))
    loss, metrics = module._loss(batch, "train")
    # policy == reference: h = 0, loss = -log sigmoid(0) = log 2 = 0.693147, rewards beta * 0 = 0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for key in ("chosen_reward", "rejected_reward", "reward_margin"):
        assert metrics[key].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["chosen_logp"] < 0 and loss.requires_grad


def test_precomputed_reference_equals_on_the_fly(setup, tmp_path):
    dm = make_data(setup)
    ref = freeze(load_causal_lm(setup["other"], dm.tokenizer))
    losses = {}
    for precompute in (False, True):
        torch.manual_seed(0)
        module = DPOModule(
            model=setup["sft"], ref_model=setup["other"], tokenizer=setup["tokenizer"], precompute_ref_logps=precompute
        )
        probe = FirstLoss()
        trainer(tmp_path, max_steps=1, limit_val_batches=1.0, num_sanity_val_steps=0, callbacks=[probe]).fit(
            module, datamodule=make_data(setup)
        )
        losses[precompute] = probe.loss
    # the reference differs from the policy, so the first loss is not log 2 and depends on ref values
    assert abs(losses[False] - math.log(2)) > 1e-3
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert module.ref_policy is None and set(module.ref_cache) == {"train", "val"}
    for split, data in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        assert module.ref_cache[split].shape == (len(data), 2)
        batch = PreferenceCollator(dm.tokenizer.pad_token_id)(data)
        with torch.no_grad():
            direct = sequence_logps(ref, batch)  # (2N,)
        torch.testing.assert_close(module.reference_logps(batch, split), direct, atol=1e-5, rtol=0)


def test_reference_frozen_and_unsaved_policy_trained(setup, tmp_path):
    module = make(setup, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    ref_before = {k: v.clone() for k, v in module.ref_policy.state_dict().items()}
    pol_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    ckpt_dir = tmp_path / "ckpt"
    trainer(
        tmp_path,
        max_steps=3,
        enable_checkpointing=True,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    ).fit(module, datamodule=make_data(setup))
    assert not module.ref_policy.training and not any(p.requires_grad for p in module.ref_policy.parameters())
    opt_params = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.ref_policy.parameters()}
    for k, v in module.ref_policy.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, pol_before[k])]
    assert len(changed) == len(pol_before)
    # the checkpoint holds the policy, not the reference (reloaded from its export)
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("ref_policy.")]
    assert {f"policy.{k}" for k in pol_before} <= set(ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["loss_fn"] == "rlhf_lightning.losses.dpo_loss"
    # resume: policy weights restored, reference from its export
    resumed = DPOModule(model=setup["sft"], tokenizer=setup["tokenizer"])
    trainer(tmp_path, max_steps=3).fit(resumed, datamodule=make_data(setup), ckpt_path=ckpt_dir / "last.ckpt")
    for k, v in resumed.policy.state_dict().items():
        assert torch.equal(v, module.policy.state_dict()[k]), k
    for k, v in resumed.ref_policy.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    # a checkpoint missing trainable weights is refused
    del ckpt["state_dict"]["policy.lm_head.weight"]
    with pytest.raises(KeyError, match="trainable"):
        resumed.on_load_checkpoint(ckpt)


def test_simpo_loads_no_reference_and_trains(setup, tmp_path):
    module = make(setup, loss_fn=simpo_loss, beta=2.0, loss_kwargs={"gamma": 0.5}, precompute_ref_logps=True)
    assert module.ref_policy is None and not module.needs_reference and module.length_normalized
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer(tmp_path, max_steps=2).fit(module, datamodule=make_data(setup))
    assert module.ref_policy is None and not module.ref_cache
    assert not any(k.startswith("ref_policy.") for k in module.state_dict())
    assert any(not torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    assert math.isfinite(module.trainer.callback_metrics["dpo/loss"].item())


def test_loss_kwargs_checked_against_loss_fn(setup):
    with pytest.raises(TypeError, match="label_smoothing"):
        DPOModule(
            model=setup["sft"], tokenizer=setup["tokenizer"], loss_fn=ipo_loss, loss_kwargs={"label_smoothing": 0.1}
        )


def test_cli_ipo_via_loss_fn(demo_workspace, monkeypatch):
    monkeypatch.chdir(demo_workspace)
    cli = cli_main(
        [
            "fit",
            "-c",
            str(DPO_CONFIG),
            "--trainer.fast_dev_run=1",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.loss_fn=rlhf_lightning.losses.ipo_loss",
            "--model.init_args.beta=0.1",
            "--model.init_args.precompute_ref_logps=true",
        ]
    )
    assert cli.model.loss_fn is ipo_loss and cli.model.ref_policy is None  # precomputed, then freed
    # step 0, policy == reference: IPO loss = (0 - 1 / (2 beta))^2 = 5^2 = 25
    assert cli.trainer.callback_metrics["dpo/loss"].item() == pytest.approx(25.0, abs=1e-3)
    assert (demo_workspace / "runs/demo/dpo/hf/config.json").exists()
