"""Exact resume of the online-RL stages: rollouts sampled after the resume (from the
restored RNG), the KL controller, the minibatch shuffle and the data position continue the
uninterrupted run bit for bit (see tests/test_resume.py for the harness)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from rlhf_lightning.data.datamodules import PromptDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.models import build_reward_model, load_causal_lm, save_hf
from rlhf_lightning.rl.rollout import Rollout, RolloutBuffer
from rlhf_lightning.systems.online_rl import OnlineRLModule
from tests.test_resume import Killed, kill_and_resume

PROMPTS = ["The movie was", "I hated this film", "Review: a fine story", "The acting was", "A terrible script"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer, tokenizer_dir):
    from tests.conftest import TINY_MODEL_CONFIG

    root = tmp_path_factory.mktemp("resume_rl")
    torch.manual_seed(0)
    save_hf(load_causal_lm(None, tokenizer, model_config=dict(TINY_MODEL_CONFIG)), tokenizer, root / "sft")
    build_reward_model(str(root / "sft"), tokenizer).save_pretrained(root / "rm", tokenizer)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{p} {i}"}) + "\n" for i in range(2) for p in PROMPTS))
    return {"sft": str(root / "sft"), "rm": str(root / "rm"), "prompts": str(prompts), "tokenizer": tokenizer_dir}


def make_data(exports):
    def build():
        return PromptDataModule(
            tokenizer=exports["tokenizer"],
            train_file=exports["prompts"],
            val_fraction=0.0,
            batch_size=3,
            max_prompt_length=16,
        )

    return build


def ppo(exports, **kw):
    """A builder of the PPO system both PPO tests resume: 2 PPO epochs x 2 minibatches = 4
    optimizer steps an iteration of 3 prompts."""

    def make_module():
        return OnlineRLModule(
            model=exports["sft"],
            reward_model=exports["rm"],
            tokenizer=exports["tokenizer"],
            sampling=SamplingConfig(max_new_tokens=6),
            ppo_epochs=2,
            minibatch_size=2,
            **kw,
        )

    return make_module


def test_ppo_killed_mid_run_resumes_exactly(exports, tmp_path):
    # 10 prompts, 3 per rollout: 4 iterations an epoch. Killed after iteration 2 (step 8),
    # mid-epoch; the adaptive KL controller moves every iteration.
    make_module = ppo(exports, kl_target=0.01, kl_horizon=10)
    rows = kill_and_resume(make_module, make_data(exports), tmp_path, kill_at=8, max_epochs=1)
    kl = [m["ppo/kl_coef"] for _, m in rows if "ppo/kl_coef" in m]
    assert len(kl) == 4 and len(set(kl)) > 1


def test_ppo_killed_iterations_after_its_checkpoint_logs_every_sample_once(exports, tmp_path):
    # A checkpoint every 2 iterations (8 optimizer steps), samples logged every iteration, killed
    # as iteration 4 starts: iteration 3's samples and metrics were logged after the last
    # checkpoint, and the resumed run logs them again; samples.jsonl is cut back at the resume.
    make_module = ppo(exports, sample_log_every_n_steps=1)
    kill_and_resume(
        make_module, make_data(exports), tmp_path, kill_at=12, redone=1, max_epochs=1, ckpt={"every_n_train_steps": 8}
    )
    lines = (tmp_path / "cut/samples.jsonl").read_text().splitlines()
    # 3 prompts per rollout, 4 a row at most: 3, 3, 3 and the last prompt of the epoch
    assert [json.loads(line)["iteration"] for line in lines] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]


class CrashBeforeBackward(L.Callback):
    """Raise as the first update of the iteration that starts at optimizer step ``at_step`` is
    about to run its backward: rollout, advantages and minibatch shuffle done, no weight changed."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.at_step:
            raise Killed(f"crashed before the backward of step {self.at_step}")


def test_ppo_crashed_before_its_first_update_resumes_from_the_exception_checkpoint(exports, tmp_path):
    # No periodic checkpoint: the one written on the crash in iteration 3 (mid-batch) is the
    # only one. It holds the state as the iteration began, the minibatch shuffle's generator
    # included (the crash came after the shuffle was drawn), so the resumed run redoes the
    # iteration exactly.
    make_module = ppo(exports, kl_target=0.01, kl_horizon=10)
    ckpt = {"every_n_train_steps": 100, "save_on_exception": True}

    def check_cut(state):  # the exception's checkpoint, in the middle of iteration 3
        assert state["mid_batch"] and state["global_step"] == 8 and state["ppo_state"]["iteration"] == 2

    kill_and_resume(make_module, make_data(exports), tmp_path, kill_at=None, crash=CrashBeforeBackward(8),
                    check_cut=check_cut, max_epochs=1, ckpt=ckpt)  # fmt: skip


def test_ppo_crashed_between_its_updates_writes_no_checkpoint_and_resumes_from_the_last(exports, tmp_path):
    # Crashed before the optimizer step of iteration 3's third update (two already taken): a
    # checkpoint of that moment would redo the iteration from moved weights, so none is written
    # (a warning says so) and last.ckpt stays the step-8 one, which resumes exactly.
    make_module = ppo(exports)
    ckpt = {"every_n_train_steps": 4, "save_on_exception": True}

    def check_cut(state):  # the periodic checkpoint after iteration 2
        assert not state["mid_batch"] and state["global_step"] == 8

    with pytest.warns(UserWarning, match="no checkpoint written for it"):
        kill_and_resume(make_module, make_data(exports), tmp_path, kill_at=10, mid_batch=True, check_cut=check_cut,
                        max_epochs=1, ckpt=ckpt)  # fmt: skip


class CrashAtBatchStart(L.Callback):
    """Raise in the callbacks' ``on_train_batch_start`` of batch ``batch_idx`` of ``epoch``:
    Lightning counts the batch as started before this hook, and before the module's."""

    def __init__(self, epoch: int, batch_idx: int):
        self.epoch, self.batch_idx = epoch, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            raise Killed(f"crashed as batch {batch_idx} of epoch {self.epoch} started")


def test_ppo_crashed_between_two_collecting_batches_keeps_the_collected_rollout(exports, tmp_path):
    # Two batches of prompts a rollout: the crash comes as epoch 1's second batch starts, with
    # its first batch's rollout in the buffer and no update taken. The exception checkpoint (the
    # only one) holds that buffer, the state as the first batch ended.
    make_module = ppo(exports, rollout_batches=2)
    ckpt = {"every_n_train_steps": 100, "save_on_exception": True}

    def check_cut(state):
        assert state["mid_batch"] and len(state["ppo_state"]["ranks"][0]["buffer"]["rollouts"]) == 1

    kill_and_resume(make_module, make_data(exports), tmp_path, kill_at=None, crash=CrashAtBatchStart(1, 1),
                    check_cut=check_cut, max_epochs=2, ckpt=ckpt)  # fmt: skip


def test_grpo_killed_at_an_epoch_boundary_resumes_exactly(exports, tmp_path):
    # Four samples a prompt, one optimizer step an iteration: step 4 ends epoch 0.
    def make_module():
        return OnlineRLModule(
            model=exports["sft"],
            reward_model=exports["rm"],
            tokenizer=exports["tokenizer"],
            stage="grpo",
            estimator="grpo",
            num_samples=4,
            kl_in_loss=True,
            kl_estimator="k3",
            kl_target=None,
            ppo_epochs=1,
            sampling=SamplingConfig(max_new_tokens=6),
        )

    kill_and_resume(make_module, make_data(exports), tmp_path, kill_at=4, max_epochs=2)


def test_rollout_buffer_round_trips_through_its_state():
    r = Rollout(
        query_ids=torch.tensor([[0, 5]]),
        query_mask=torch.tensor([[0, 1]]),
        response_ids=torch.tensor([[7, 8]]),
        response_mask=torch.tensor([[1, 1]]),
        scores=torch.tensor([0.5]),
        prompts=["hi"],
    )
    buffer, again = RolloutBuffer(pad_token_id=0), RolloutBuffer(pad_token_id=0)
    buffer.add(r)
    again.load_state_dict(buffer.state_dict())
    assert len(again) == 1 and again.all().prompts == ["hi"]
    assert torch.equal(again.all().response_ids, r.response_ids) and again.all().logprobs is None
