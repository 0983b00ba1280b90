"""SFT system: the loss against a naive loop, gradient accumulation, export."""

from __future__ import annotations

import json

import lightning as L
import torch
from transformers import AutoModelForCausalLM

from rlhf_lightning.data.datamodules import SFTDataModule
from rlhf_lightning.systems.sft import SFTModule


def write_sft(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_sft_loss_equals_naive_token_loop(tokenizer_dir, tiny_config, tmp_path):
    records = [
        {"prompt": "The movie was", "response": " great and fun."},
        {"prompt": "I hated this film, the plot", "response": " was bad."},
    ]
    dm = SFTDataModule(
        tokenizer=tokenizer_dir, train_file=write_sft(tmp_path / "d.jsonl", records), val_fraction=0.0, batch_size=2
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    module = SFTModule(model_config=tiny_config, tokenizer=tokenizer_dir)
    module.configure_model()
    loss, _ = module._loss(batch)
    # Naive: for each row, each position t whose NEXT label is a response token, -log p(label).
    logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = 0.0, 0
    for b in range(2):
        for t in range(batch["input_ids"].shape[1] - 1):
            label = int(batch["labels"][b, t + 1])
            if label == -100:
                continue
            total += -torch.log_softmax(logits[b, t], -1)[label]
            count += 1
    # Prompt tokens carry no loss: the count is the response tokens plus one EOS per row.
    n_resp = sum(len(dm.tokenizer(r["response"], add_special_tokens=False).input_ids) + 1 for r in records)
    assert count == n_resp
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)


def _one_step_grads(tokenizer_dir, tiny_config, train_file, batch_size, accumulate, tmp_path, fixed_order=True):
    """Gradient of the first optimizer step; ``fixed_order=False`` uses the real (shuffled,
    seeded, token-weighted) training loader instead of a plain one in file order."""
    L.seed_everything(0)
    dm = SFTDataModule(tokenizer=tokenizer_dir, train_file=train_file, val_fraction=0.0, batch_size=batch_size)
    module = SFTModule(
        model_config=tiny_config, tokenizer=tokenizer_dir, optimizer=lambda p: torch.optim.SGD(p, lr=1.0)
    )
    grads = {}

    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not grads:
                grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    dm.setup("fit")
    if fixed_order:
        dm.train_dataloader = lambda: torch.utils.data.DataLoader(  # the same 4 examples, no loss denominator
            dm.train_dataset, batch_size=batch_size, shuffle=False, collate_fn=dm.collator()
        )
    L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Grab()],
        default_root_dir=str(tmp_path),
    ).fit(module, datamodule=dm)
    return grads


def test_gradient_accumulation_invariance(tokenizer_dir, tiny_config, tmp_path):
    # Micro-batches with equal response-token counts: token mean per micro-batch then
    # averaged over 2 micro-batches equals the token mean of the whole batch of 4.
    records = [
        {"prompt": p, "response": " the movie was great."}
        for p in ["Review:", "I hated this film", "My thoughts on this movie:", "The music was"]
    ]
    train_file = write_sft(tmp_path / "acc.jsonl", records)
    full = _one_step_grads(tokenizer_dir, tiny_config, train_file, 4, 1, tmp_path / "a")
    accumulated = _one_step_grads(tokenizer_dir, tiny_config, train_file, 2, 2, tmp_path / "b")
    assert full.keys() == accumulated.keys() and full
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_is_exact_with_ragged_micro_batches(tokenizer_dir, tiny_config, tmp_path):
    # Responses of 1 to 12 words: micro-batches hold very different token counts, so a mean of
    # per-micro-batch token means would differ from the token mean of the step; the loss
    # denominator of SFTDataModule makes 1x4 = 2x2 = 4x1 (the loader's seeded order puts the
    # same 4 examples in the first step whatever the batch size).
    words = "the movie was great and the actors were wonderful in every scene".split()
    records = [
        {"prompt": p, "response": " " + " ".join(words[:k])}
        for p, k in [
            ("Review:", 1),
            ("I hated this film", 12),
            ("My thoughts on this movie:", 3),
            ("The music was", 9),
            ("A fine story", 5),
            ("This film is", 2),
        ]
    ]
    train_file = write_sft(tmp_path / "ragged.jsonl", records)
    full = _one_step_grads(tokenizer_dir, tiny_config, train_file, 4, 1, tmp_path / "a", fixed_order=False)
    assert full
    for batch_size, accumulate in ((2, 2), (1, 4)):
        accumulated = _one_step_grads(
            tokenizer_dir,
            tiny_config,
            train_file,
            batch_size,
            accumulate,
            tmp_path / f"{batch_size}",
            fixed_order=False,
        )
        assert accumulated.keys() == full.keys()
        for name in full:
            torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6)


def test_export_reloads_with_identical_logits(tokenizer_dir, tiny_config, tmp_path):
    module = SFTModule(model_config=tiny_config, tokenizer=tokenizer_dir)
    module.configure_model()
    module.policy.eval()
    module.export_hf(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([module.tokenizer("The movie was great").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(module.policy(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    # Continuing from the export: the policy must come back in train mode (from_pretrained
    # returns eval mode, Lightning keeps it, and HF skips gradient checkpointing outside train mode).
    again = SFTModule(model=str(tmp_path / "hf"), gradient_checkpointing=True)
    again.configure_model()
    assert again.policy.training and again.policy.is_gradient_checkpointing
