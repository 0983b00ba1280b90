"""Reward-model system: padding invariance, one forward = two, swap symmetry, export, normalisation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf_lightning.cli import cli_main
from rlhf_lightning.data.datamodules import PreferenceDataModule
from rlhf_lightning.losses import pairwise_loss
from rlhf_lightning.models import load_reward_model, save_hf
from rlhf_lightning.systems.reward import RewardModule, RewardNormalization, score_batches

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "reward.yaml"

PAIRS = [
    {"prompt": "The movie was", "chosen": " great and wonderful.", "rejected": " bad."},
    {
        "prompt": "I hated this film,",
        "chosen": " the music was lovely!",
        "rejected": " the plot was boring and bad and dull.",
    },
    {"prompt": "Review:", "chosen": " a fine story.", "rejected": " a terrible script, weak actors."},
    {"prompt": "My thoughts on this movie:", "chosen": " it was wonderful!", "rejected": " it was not good at all."},
    {"prompt": "The music was", "chosen": " lovely and the ending made me smile!", "rejected": " dull."},
    {"prompt": "A terrible script,", "chosen": " but great acting.", "rejected": " weak actors and a dull ending."},
    {"prompt": "The acting was", "chosen": " wonderful.", "rejected": " bad and the plot was boring."},
]
SFT = [{"prompt": p["prompt"], "response": r} for p in PAIRS for r in (p["chosen"], p["rejected"])]


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def swapped(records: list[dict]) -> list[dict]:
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]


def make_module(tokenizer_dir, tiny_config, seed: int = 0, **kw) -> RewardModule:
    torch.manual_seed(seed)
    module = RewardModule(model_config=tiny_config, tokenizer=tokenizer_dir, **kw)
    module.configure_model()
    return module


def preference_batch(tokenizer_dir, tmp_path, records=PAIRS) -> dict:
    """All ``records`` as one collated batch, in file order."""
    dm = PreferenceDataModule(
        tokenizer=tokenizer_dir, train_file=write_jsonl(tmp_path / "p.jsonl", records), val_fraction=0.0
    )
    dm.setup("fit")
    return dm.collator()(dm.train_dataset)


def test_score_unchanged_by_extra_right_padding(tokenizer_dir, tiny_config, tmp_path):
    module = make_module(tokenizer_dir, tiny_config).eval()
    batch = preference_batch(tokenizer_dir, tmp_path)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (2B, T), rows of different lengths
    assert (mask.sum(1) < ids.shape[1]).any()  # some rows are padded already
    pad = module.tokenizer.pad_token_id
    wide_ids = torch.cat([ids, torch.full((ids.shape[0], 7), pad)], dim=1)  # (2B, T+7)
    wide_mask = torch.cat([mask, torch.zeros(ids.shape[0], 7, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        scores = module(ids, mask)
        torch.testing.assert_close(module(wide_ids, wide_mask), scores, rtol=1e-5, atol=1e-5)
        # Each row alone, with no padding at all.
        alone = torch.stack(
            [
                module(ids[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())])[0]
                for i in range(ids.shape[0])
            ]
        )
    torch.testing.assert_close(alone, scores, rtol=1e-5, atol=1e-5)
    # The score is not constant (else the checks above would be vacuous).
    assert scores.std() > 1e-4


def test_one_concatenated_forward_equals_two_forwards(tokenizer_dir, tiny_config, tmp_path):
    module = make_module(tokenizer_dir, tiny_config)
    batch = preference_batch(tokenizer_dir, tmp_path)
    B = batch["num_pairs"]
    loss, metrics = module._step(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()

    def half(rows: slice) -> torch.Tensor:
        mask = batch["attention_mask"][rows]
        width = int(mask.sum(1).max())  # each half padded only to its own longest row
        return module(batch["input_ids"][rows, :width], mask[:, :width])  # (B,)

    chosen, rejected = half(slice(0, B)), half(slice(B, 2 * B))
    loss2, metrics2 = pairwise_loss(chosen, rejected)
    loss2.backward()
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["accuracy"], metrics2["accuracy"])
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _validate(module, tokenizer_dir, records, tmp_path, name) -> dict[str, float]:
    # 7 pairs in batches of 3 (3 + 3 + 1): the epoch accuracy must count pairs, not average batches.
    dm = PreferenceDataModule(
        tokenizer=tokenizer_dir,
        train_file=write_jsonl(tmp_path / f"{name}_t.jsonl", records),
        val_file=write_jsonl(tmp_path / f"{name}_v.jsonl", records),
        batch_size=3,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    return {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}


def test_swapping_chosen_and_rejected_turns_accuracy_a_into_1_minus_a(tokenizer_dir, tiny_config, tmp_path):
    # Seed 3 gives this random model an accuracy that is neither 0, 1/2 nor 1 on these pairs.
    module = make_module(tokenizer_dir, tiny_config, seed=3).eval()
    batch = preference_batch(tokenizer_dir, tmp_path)
    with torch.no_grad():
        scores = module(batch["input_ids"], batch["attention_mask"])
    n = len(PAIRS)
    naive = sum(float(scores[i] > scores[n + i]) for i in range(n)) / n
    assert naive not in (0.0, 0.5, 1.0)

    a = _validate(module, tokenizer_dir, PAIRS, tmp_path, "orig")
    b = _validate(module, tokenizer_dir, swapped(PAIRS), tmp_path, "swap")
    assert a["val/rm/accuracy"] == pytest.approx(naive)  # over all 7 pairs, not a mean of batch means
    assert b["val/rm/accuracy"] == pytest.approx(1.0 - a["val/rm/accuracy"])
    assert b["val/rm/margin"] == pytest.approx(-a["val/rm/margin"], abs=1e-5)
    assert a["val/rm/loss"] != pytest.approx(b["val/rm/loss"])


def test_margin_enters_the_loss_only_when_asked(tokenizer_dir, tiny_config, tmp_path):
    records = [{**r, "margin": 2.0} for r in PAIRS]
    batch = preference_batch(tokenizer_dir, tmp_path, records)
    with_margin, _ = make_module(tokenizer_dir, tiny_config, use_margin=True)._step(batch)
    without, _ = make_module(tokenizer_dir, tiny_config, use_margin=False)._step(batch)
    plain, _ = make_module(tokenizer_dir, tiny_config)._step({k: v for k, v in batch.items() if k != "margin"})
    torch.testing.assert_close(without, plain)
    # -log sigmoid(d - 2) > -log sigmoid(d) for every pair.
    assert with_margin > without


def test_export_loads_with_auto_class_and_gives_the_same_scores(tokenizer_dir, tiny_config, tmp_path):
    module = make_module(tokenizer_dir, tiny_config).eval()
    module.reward_model.set_normalization(2.0, 0.5)
    path = module.export_hf(tmp_path / "hf")
    batch = preference_batch(tokenizer_dir, tmp_path)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # right-padded with the pad id
    hf = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()  # no num_labels given
    assert hf.config.num_labels == 1
    with torch.no_grad():
        raw = module(ids, mask)
        # The stock HF forward reads the score at the last non-pad token too.
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[:, 0], raw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_reward_model(path)(ids, mask), 2.0 * raw + 0.5, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_reward_model(path, normalize=False)(ids, mask), raw, rtol=1e-5, atol=1e-5)
    assert (Path(path) / "model.safetensors").exists() and (Path(path) / "tokenizer.json").exists()


def test_normalization_gives_mean_0_std_1_and_travels_in_the_export(tokenizer_dir, tiny_config, tmp_path):
    module = make_module(tokenizer_dir, tiny_config)
    samples = write_jsonl(tmp_path / "sft.jsonl", SFT)
    callback = RewardNormalization(samples, batch_size=4, max_prompt_length=32, max_response_length=32)
    batches = callback.batches(module.tokenizer)
    assert sum(len(b["input_ids"]) for b in batches) == len(SFT)
    raw = score_batches(module.reward_model, batches, normalize=False)
    mean, std = callback.normalize(module)
    assert mean == pytest.approx(raw.mean().item(), abs=1e-6)
    assert std == pytest.approx(raw.std(correction=0).item(), rel=1e-5)
    assert abs(mean) > 1e-3 and abs(std - 1) > 1e-3  # the raw scores were not normalised already
    assert module.reward_model.gain == pytest.approx(1 / std) and module.reward_model.bias == pytest.approx(-mean / std)

    normed = score_batches(module.reward_model, batches, normalize=True)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normed.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # load_reward_model applies the stored gain/bias; normalize=False gives the raw scores back.
    path = module.export_hf(tmp_path / "hf")
    cfg = json.loads((Path(path) / "config.json").read_text())
    assert cfg["rlhf_reward_gain"] == pytest.approx(1 / std) and cfg["rlhf_reward_bias"] == pytest.approx(-mean / std)
    torch.testing.assert_close(score_batches(load_reward_model(path), batches), normed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        score_batches(load_reward_model(path, normalize=False), batches), raw, rtol=1e-5, atol=1e-5
    )


def test_normalization_runs_on_the_averaged_weights(tokenizer_dir, tiny_config, tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    samples = write_jsonl(tmp_path / "sft.jsonl", SFT)

    def fit(callbacks):
        module = make_module(tokenizer_dir, tiny_config, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        dm = PreferenceDataModule(
            tokenizer=tokenizer_dir,
            train_file=write_jsonl(tmp_path / "t.jsonl", PAIRS),
            val_fraction=0.0,
            batch_size=2,
            max_prompt_length=32,
            max_response_length=32,
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(module, datamodule=dm)
        return module

    norm = RewardNormalization(samples)
    # EMA copies its average into the model in on_train_end: listed after, it would invalidate the gain/bias.
    with pytest.raises(ValueError, match="before RewardNormalization"):
        fit([norm, EMAWeightAveraging(decay=0.5)])
    module = fit([EMAWeightAveraging(decay=0.5), norm])
    normed = score_batches(module.reward_model, norm.batches(module.tokenizer), normalize=True)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normed.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)


def test_starts_from_sft_export_backbone(tokenizer, tokenizer_dir, tiny_lm, tmp_path):
    save_hf(tiny_lm, tokenizer, tmp_path / "sft")
    module = RewardModule(model=str(tmp_path / "sft"), tokenizer=tokenizer_dir)
    module.configure_model()
    module.configure_model()  # idempotent: the same model object
    backbone = module.reward_model.model.base_model.state_dict()
    sft = tiny_lm.model.state_dict()
    assert backbone.keys() == sft.keys() and len(sft) > 10
    for name, tensor in sft.items():
        torch.testing.assert_close(backbone[name], tensor, rtol=0, atol=0, msg=name)
    head = module.reward_model.model.score.weight  # (1, H), new: N(0, 1/sqrt(H+1))
    assert head.shape == (1, tiny_lm.config.hidden_size) and head.abs().sum() > 0


def test_learns_a_separable_preference(tokenizer_dir, tiny_config, tmp_path):
    # Chosen responses praise, rejected ones pan: a few dozen steps must rank all pairs right.
    good = [" great.", " wonderful.", " lovely!", " a fine story."]
    bad = [" bad.", " terrible.", " dull!", " a weak ending."]
    prompts = ["The movie was", "The music was", "Review:", "The acting was"]
    records = [{"prompt": p, "chosen": g, "rejected": b} for p in prompts for g in good for b in bad]
    L.seed_everything(0)
    module = make_module(tokenizer_dir, tiny_config, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = PreferenceDataModule(
        tokenizer=tokenizer_dir,
        train_file=write_jsonl(tmp_path / "sep.jsonl", records),
        val_file=write_jsonl(tmp_path / "sep_v.jsonl", records),
        batch_size=16,
    )
    before = _validate(module, tokenizer_dir, records, tmp_path, "before")["val/rm/accuracy"]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    after = trainer.callback_metrics["val/rm/accuracy"].item()
    assert after == 1.0 and before < 1.0
    assert trainer.callback_metrics["val/rm/margin"].item() > 0


def test_cli_fast_dev_run_normalises_before_export(tokenizer, tokenizer_dir, tiny_lm, tmp_path, monkeypatch):
    # The real config, pointed at tiny data and a tiny SFT export; the run directory
    # (runs/demo/reward, relative in the config) and the normalisation samples
    # (data/demo/sft.jsonl) resolve inside tmp_path.
    monkeypatch.chdir(tmp_path)
    save_hf(tiny_lm, tokenizer, tmp_path / "sft_export")
    samples = write_jsonl(tmp_path / "data/demo/sft.jsonl", SFT)
    cli_main(
        [
            "fit",
            "-c",
            str(CONFIG),
            "--trainer.fast_dev_run=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu",
            f"--model.init_args.model={tmp_path / 'sft_export'}",
            f"--data.init_args.tokenizer={tokenizer_dir}",
            f"--data.init_args.train_file={write_jsonl(tmp_path / 'train.jsonl', PAIRS)}",
            f"--data.init_args.val_file={write_jsonl(tmp_path / 'val.jsonl', swapped(PAIRS))}",
            "--data.init_args.batch_size=4",
        ]
    )
    export = tmp_path / "runs/demo/reward/hf"
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and len(cfg["id2label"]) == 1
    assert cfg["rlhf_reward_gain"] != 1.0  # set by RewardNormalization before HFExport wrote it
    # The exported, normalised model scores the samples with mean 0 and std 1.
    batches = RewardNormalization(samples, max_prompt_length=32, max_response_length=48).batches(tokenizer)
    scores = score_batches(load_reward_model(export), batches)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
