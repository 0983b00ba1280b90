"""LoRA adapters on every stage: the reference is the base with the adapter off, frozen weights stay
frozen, exports (merged or adapter-only) load with plain transformers / peft, checkpoints resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_lightning.cli import cli_main
from rlhf_lightning.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.models import LoraSettings, build_reward_model, has_lora, load_causal_lm, save_hf
from rlhf_lightning.models.adapters import is_adapter_dir, lora_wrapper
from rlhf_lightning.systems.dpo import DPOModule, sequence_logps
from rlhf_lightning.systems.ppo import PPOModule
from rlhf_lightning.systems.reward import RewardModule
from rlhf_lightning.systems.sft import SFTModule
from tests.conftest import TINY_MODEL_CONFIG, quiet_trainer

LORA = LoraSettings(r=4, alpha=8.0)
PAIRS = [
    ("The movie was", " great and the acting was wonderful.", " boring and bad."),
    ("I hated this film,", " the plot was boring.", " the music was lovely!"),
    ("Review:", " a fine story with a few slow scenes.", " a terrible script."),
    ("The music was", " lovely and the ending made me smile!", " weak."),
]
PROMPTS = ["The movie was", "I hated this film", "Review: a fine story", "The acting was"]


def adam(lr=1e-2):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, tokenizer_dir):
    """A tiny policy export, its reward-model export, and SFT / preference / prompt files."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    save_hf(load_causal_lm(None, tokenizer, model_config=dict(TINY_MODEL_CONFIG)), tokenizer, root / "sft")
    build_reward_model(str(root / "sft"), tokenizer).save_pretrained(root / "rm", tokenizer)
    lines = {
        "pairs": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS * 2],
        "sft_data": [{"prompt": p, "response": c} for p, c, _ in PAIRS * 2],
        "prompts": [{"prompt": p} for p in PROMPTS * 2],
    }
    for name, records in lines.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return (
        {k: str(root / k) for k in ("sft", "rm")}
        | {k: str(root / f"{k}.jsonl") for k in lines}
        | {"tokenizer": tokenizer_dir, "root": root}
    )


def preference_data(files):
    dm = PreferenceDataModule(
        tokenizer=files["tokenizer"], train_file=files["pairs"], val_fraction=0.0, batch_size=4, max_prompt_length=16
    )
    dm.setup("fit")
    return dm


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_dpo_reference_is_the_base_with_the_adapter_off(files, tmp_path):
    module = DPOModule(model=files["sft"], tokenizer=files["tokenizer"], lora=LORA, optimizer=adam())
    module.configure_model()
    assert module.ref_policy is None and module.reference_is_base  # no second copy in memory
    n, total = module.trainable_params
    assert 0 < n < total / 2 and n == sum(p.numel() for p in module.parameters() if p.requires_grad)
    batch = next(iter(preference_data(files).train_dataloader()))
    plain = load_causal_lm(files["sft"], module.tokenizer).eval()
    with torch.no_grad():
        base_logps = sequence_logps(plain, batch)  # (2B,)
    torch.testing.assert_close(module.reference_logps(batch, "train"), base_logps, rtol=0, atol=1e-6)
    frozen, trained = frozen_state(module.policy), trainable_state(module.policy)

    ckpt_dir = tmp_path / "ckpt"
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]
    quiet_trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=callbacks).fit(
        module, datamodule=preference_data(files)
    )
    assert module.policy.training  # the reference context put the policy back in train mode
    for name, p in module.policy.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen base weight {name} changed"
        else:
            assert not torch.equal(p, trained[name]), f"adapter weight {name} did not train"
    with torch.no_grad():
        policy_logps = sequence_logps(module.policy.eval(), batch)
    module.policy.train()
    assert (policy_logps - base_logps).abs().max() > 1e-3  # the policy moved...
    torch.testing.assert_close(
        module.reference_logps(batch, "train"), base_logps, rtol=0, atol=1e-6
    )  # ...not its reference

    # The checkpoint holds the adapter, not the base (reloaded from the export); resume restores it.
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["state_dict"]
    assert any("lora_A" in k for k in state) and not [k for k in state if k.endswith("base_layer.weight")]
    assert "policy.model.embed_tokens.weight" not in state
    resumed = DPOModule(model=files["sft"], tokenizer=files["tokenizer"], lora=LORA, optimizer=adam())
    quiet_trainer(tmp_path, max_steps=3).fit(
        resumed, datamodule=preference_data(files), ckpt_path=ckpt_dir / "last.ckpt"
    )
    for (name, p), q in zip(module.policy.named_parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_sft_exports_merged_by_default_and_adapter_on_request(files, tmp_path):
    dm = SFTDataModule(tokenizer=files["tokenizer"], train_file=files["sft_data"], val_fraction=0.0, batch_size=4)
    module = SFTModule(model=files["sft"], lora=LORA, optimizer=adam())
    quiet_trainer(tmp_path, max_steps=3).fit(module, datamodule=dm)
    ids = torch.tensor([[5, 17, 42, 9, 33, 61]])
    module.policy.eval()
    with torch.no_grad():
        expected = module.policy(input_ids=ids).logits

    merged_dir = module.export_hf(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not has_lora(merged) and has_lora(module.policy)  # the export did not unmerge the policy
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)

    module.hparams["lora"] = LoraSettings(r=4, alpha=8.0, export="adapter")
    adapter_dir = module.export_hf(tmp_path / "adapter")
    assert is_adapter_dir(adapter_dir) and (adapter_dir / "tokenizer_config.json").is_file()
    plain_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["sft"]), adapter_dir).eval()
    torch.testing.assert_close(plain_peft(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    # Plain transformers loads it too (with peft installed: the base from the adapter config).
    auto = AutoModelForCausalLM.from_pretrained(adapter_dir).eval()
    torch.testing.assert_close(auto(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)

    # The next stage, started from the adapter-only export, has the SFT policy (not the bare
    # base) as its policy and reference.
    dpo = DPOModule(model=str(adapter_dir), lora=LORA)
    dpo.configure_model()
    with dpo.reference() as ref, torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_reward_lora_trains_head_and_adapter_and_exports_merged(files, tmp_path):
    module = RewardModule(model=files["sft"], tokenizer=files["tokenizer"], lora=LORA, optimizer=adam())
    module.configure_model()
    head = module.reward_model.model.score
    assert all(p.requires_grad for p in head.modules_to_save.parameters())  # the new head trains in full
    frozen, trained = frozen_state(module.reward_model), trainable_state(module.reward_model)
    quiet_trainer(tmp_path, max_steps=3).fit(module, datamodule=preference_data(files))
    for name, p in module.reward_model.named_parameters():
        assert torch.equal(p, frozen[name]) if name in frozen else not torch.equal(p, trained[name]), name
    batch = next(iter(preference_data(files).train_dataloader()))
    module.eval()
    with torch.no_grad():
        scores = module(batch["input_ids"], batch["attention_mask"])
    path = module.export_hf(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert lora_wrapper(plain) is None
    from rlhf_lightning.models import RewardModel

    with torch.no_grad():
        reloaded = RewardModel(plain)(batch["input_ids"], batch["attention_mask"], normalize=False)
    torch.testing.assert_close(reloaded, scores, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        RewardModule(model=files["sft"], lora={"r": 4, "export": "adapter"})


def test_ppo_lora_policy_and_critic_reference_shared(files, tmp_path):
    L.seed_everything(0)
    module = PPOModule(
        model=files["sft"],
        reward_model=files["rm"],
        tokenizer=files["tokenizer"],
        lora=LORA,
        sampling=SamplingConfig(max_new_tokens=6),
        ppo_epochs=1,
        optimizer=adam(1e-3),
    )
    module.configure_model()
    assert module.ref_policy is None and module.reference_is_base
    assert has_lora(module.policy) and has_lora(module.critic) and not has_lora(module.reward_model)
    frozen = {name: frozen_state(getattr(module, name)) for name in ("policy", "critic", "reward_model")}
    trained = {name: trainable_state(getattr(module, name)) for name in ("policy", "critic")}
    dm = PromptDataModule(
        tokenizer=files["tokenizer"], train_file=files["prompts"], val_fraction=0.0, batch_size=4, max_prompt_length=16
    )
    dm.setup("fit")
    quiet_trainer(tmp_path, max_steps=2).fit(module, datamodule=dm)
    for name in ("policy", "critic", "reward_model"):
        for pname, p in getattr(module, name).named_parameters():
            if pname in frozen[name]:
                assert torch.equal(p, frozen[name][pname]), f"{name}.{pname} is frozen but changed"
            else:
                assert not torch.equal(p, trained[name][pname]), f"{name}.{pname} did not train"
    # The reference still scores exactly like the export it started from.
    ids = torch.tensor([[5, 17, 42, 9, 33, 61]])
    plain = AutoModelForCausalLM.from_pretrained(files["sft"]).eval()
    with module.reference() as ref:
        torch.testing.assert_close(ref(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_explicit_reference_model_is_loaded_not_shared(files):
    module = DPOModule(model=files["sft"], ref_model=files["sft"], lora=LORA)
    module.configure_model()
    assert module.reference_is_base  # the same path as model: shared
    other = files["root"] / "other"
    torch.manual_seed(1)
    save_hf(load_causal_lm(None, module.tokenizer, model_config=dict(TINY_MODEL_CONFIG)), module.tokenizer, other)
    module = DPOModule(model=files["sft"], ref_model=str(other), lora=LORA)
    module.configure_model()
    assert not module.reference_is_base and module.ref_policy is not None


STAGES = ["sft", "reward", "dpo", "ppo", "grpo", "rloo", "reinforce_pp"]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", STAGES)
def test_commented_lora_keys_parse_when_uncommented(name, tmp_path, capsys):
    """Every stage config carries a commented ``lora:`` line; uncommented, the config still parses."""
    text = (CONFIGS / f"{name}.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("# lora: {"))
    config = tmp_path / f"{name}.yaml"
    config.write_text(text.replace(line, line.replace("# lora:", "lora:", 1)))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "-c", str(config), "--trainer.precision=bf16-mixed", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["lora"]["r"] == 16
    assert printed["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft", "dpo", "ppo"])
def test_cli_runs_lora_bf16_on_the_demo_exports(name, demo_workspace, monkeypatch, tmp_path):
    """The command lines a GPU check uses, here on CPU: LoRA and bf16-mixed from the command line."""
    monkeypatch.chdir(demo_workspace)
    extra = [] if name == "sft" else ["--model.init_args.model=runs/demo/sft/hf"]
    if name == "sft":  # on a checkpoint, not from scratch: model= replaces model_config
        extra = ["--model.init_args.model=runs/demo/sft/hf", "--model.init_args.model_config=null"]
    cli = cli_main(
        [
            "fit",
            "-c",
            str(CONFIGS / f"{name}.yaml"),
            *extra,
            "--model.init_args.lora.r=4",
            "--model.init_args.lora.alpha=8",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step >= 1 and has_lora(cli.model.policy)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # a plain model, adapter merged in
    assert not [k for k in merged.state_dict() if "lora" in k]
