"""SL-CAI: degenerate outputs counted and dropped, transcripts written, principles drawn; a chat model's
conventions (ChatML template, system role) through SL-CAI and AI feedback end to end."""

from __future__ import annotations

import json
import math

import torch

from rlhf_lightning.cai import ChatFormat, Constitution, Principle
from rlhf_lightning.cai.generate import Completion
from rlhf_lightning.cai.revise import ReviseSettings, draw_principles, generate_revisions
from tests import tokenizer_conventions
from tests.conftest import TINY_MODEL_CONFIG

P = Principle("rude", "Rude?", "Fix it.", "Which is kinder?")
CONST = Constitution((P,), chat=ChatFormat(template=False))


class NoTemplate:
    chat_template = None


def scripted(answers: dict[str, tuple[str, bool]], calls: list[list[str]]):
    """A stand-in for ``complete``: the answer of a prompt is looked up by the prompt's last line."""

    def complete(model, tokenizer, texts, sampling, batch_size, max_prompt_length):
        calls.append(list(texts))
        out = []
        for t in texts:
            key = t if t.startswith("p") else t.rsplit("\n\nHuman: ", 1)[-1].split("\n")[0] + "|" + t.split("\n")[2]
            text, ended = answers[key]
            out.append(Completion(text, ended, False))
        return out

    return complete


def test_degenerate_outputs_are_counted_and_dropped(monkeypatch):
    # The key of a critique/revision prompt: its request, then the line holding the current response.
    answers = {
        "p0": (" r0", True),
        "p1": (" r1", True),
        "p2": (" r2", False),  # the first response has no EOS: kept, a revision may fix it
        "p3": (" r3", True),
        "p4": (" r4", True),
        "p5": (" r5", True),
        "Rude?|Assistant: r0": (" too blunt", True),
        "Rude?|Assistant: r1": (" unfinished critique", False),  # critique_no_eos
        "Rude?|Assistant: r2": (" cut off", True),
        "Rude?|Assistant: r3": (" fine", True),
        "Rude?|Assistant: r4": (" fine", True),
        "Rude?|Assistant: r5": (" fine", True),
        "Fix it.|Assistant: r0": (" kind r0", True),
        "Fix it.|Assistant: r2": (" ", True),  # revision_empty
        "Fix it.|Assistant: r3": (" r3", True),  # revision_identical
        "Fix it.|Assistant: r4": (" endless", False),  # revision_no_eos
        "Fix it.|Assistant: r5": (" kind r5", True),
    }
    calls: list[list[str]] = []
    monkeypatch.setattr("rlhf_lightning.cai.revise.complete", scripted(answers, calls))
    prompts = [{"prompt": f"p{i}", "text": f"p{i}"} for i in range(6)]
    out = generate_revisions(None, NoTemplate(), prompts, CONST, ReviseSettings(rounds=1))
    assert out["counts"] == {
        "prompts": 6,
        "kept": 2,
        "critique_no_eos": 1,
        "revision_no_eos": 1,
        "revision_empty": 1,
        "revision_identical": 1,
        "response_no_eos": 1,
        "prompts_truncated": 0,
    }
    assert out["sft"] == [{"prompt": "p0", "response": " kind r0"}, {"prompt": "p5", "response": " kind r5"}]
    assert out["preferences"][0] == {"prompt": "p0", "chosen": " kind r0", "rejected": " r0"}
    # one batched call per step: responses (6), critiques (6), revisions (the 5 with a finished critique)
    assert [len(c) for c in calls] == [6, 6, 5]
    assert calls[1][0] == "Human: p0\n\nAssistant: r0\n\nHuman: Rude?\n\nAssistant:"
    t = out["transcripts"]
    assert t[0] == {
        "prompt": "p0",
        "rounds": [{"principle": "rude", "critique": " too blunt", "revision": " kind r0"}],
        "dropped": None,
        "response": " r0",
    }
    assert [x["dropped"] for x in t] == [
        None,
        "critique_no_eos",
        "revision_empty",
        "revision_identical",
        "revision_no_eos",
        None,
    ]


def test_rounds_revise_the_latest_revision(monkeypatch):
    answers = {
        "p0": (" a", True),
        "Rude?|Assistant: a": (" c1", True),
        "Fix it.|Assistant: a": (" b", True),
        "Rude?|Assistant: b": (" c2", True),
        "Fix it.|Assistant: b": (" c", True),
    }
    calls: list[list[str]] = []
    monkeypatch.setattr("rlhf_lightning.cai.revise.complete", scripted(answers, calls))
    out = generate_revisions(None, NoTemplate(), [{"prompt": "p0", "text": "p0"}], CONST, ReviseSettings(rounds=2))
    assert out["sft"] == [{"prompt": "p0", "response": " c"}]
    assert out["preferences"] == [{"prompt": "p0", "chosen": " c", "rejected": " a"}]
    assert [r["revision"] for r in out["transcripts"][0]["rounds"]] == [" b", " c"]


def test_principles_are_drawn_uniformly_and_reproducibly():
    const = Constitution(tuple(Principle(f"p{i}", "c", "r") for i in range(3)))
    drawn = draw_principles(const, 3000, 2, seed=1)
    assert drawn == draw_principles(const, 3000, 2, seed=1) and len(drawn[0]) == 2
    counts = [sum(row.count(i) for row in drawn) for i in range(3)]
    assert all(abs(c / 6000 - 1 / 3) < 0.03 for c in counts)


def _eos_prone_chat_model(tokenizer, p_eos: float = 0.3):
    """A tiny Llama whose next token is uniform apart from EOS, which has probability about ``p_eos``:
    attention and MLP outputs are zero, every embedding has 10 in dimension 0, and only EOS reads it."""
    from rlhf_lightning.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(None, tokenizer, model_config=dict(TINY_MODEL_CONFIG))
    d, V = model.config.hidden_size, model.config.vocab_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.mul_(0.01)[:, 0] = 10.0
        model.lm_head.weight.mul_(0.01)[:, 0] = 0.0
        # normed h_0 ~ sqrt(d): EOS logit = c sqrt(d) with exp(c sqrt(d)) = p/(1-p) (V-1)
        model.lm_head.weight[tokenizer.eos_token_id, 0] = math.log(p_eos / (1 - p_eos) * (V - 1)) / math.sqrt(d)
    return model.eval()


def test_chat_conventions_through_sl_cai_and_ai_feedback(tmp_path):
    from rlhf_lightning.cai.label import LabelSettings, run_label
    from rlhf_lightning.cai.revise import run_revise
    from rlhf_lightning.generation import SamplingConfig
    from rlhf_lightning.models import load_tokenizer, save_hf

    tok = load_tokenizer(tokenizer_conventions.build("chatml", tmp_path / "tok"))
    save_hf(_eos_prone_chat_model(tok), tok, tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Film {i}?"}]}
        for i in range(12)
    ] + [{"prompt": "A plain prompt."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    const = tmp_path / "c.yaml"
    const.write_text(
        "principles:\n  - {name: rude, critique_request: 'Rude?', revision_request: Fix it., choice: 'Kinder?'}\n"
        "chat: {system: You are kind.}\n"
    )
    sampling = SamplingConfig(max_new_tokens=12)
    out = tmp_path / "revise"
    stats = run_revise(
        str(tmp_path / "policy"),
        str(prompts),
        str(const),
        str(out),
        ReviseSettings(rounds=2, batch_size=5, sampling=sampling),
    )
    counts = stats["counts"]
    assert counts["prompts"] == 13 and counts["kept"] >= 1
    assert (
        counts["kept"]
        + sum(counts[k] for k in ("critique_no_eos", "revision_no_eos", "revision_empty", "revision_identical"))
        == 13
    )
    transcripts = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert len(transcripts) == 13 and transcripts[0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == counts["kept"] == len((out / "preferences.jsonl").read_text().splitlines())
    assert json.loads((out / "stats.json").read_text())["counts"] == counts
    label = run_label(
        str(tmp_path / "policy"),
        str(tmp_path / "policy"),
        str(prompts),
        str(const),
        str(tmp_path / "label"),
        LabelSettings(samples_per_prompt=3, sampling=sampling, val_fraction=0.25),
    )
    n = label["counts"]
    assert n["samples"] == 39 and n["pairs"] + n["identical_pairs"] + n["empty_pairs"] == 39
    pairs = [
        json.loads(line)
        for f in ("preferences_train", "preferences_val")
        for line in (tmp_path / "label" / f"{f}.jsonl").read_text().splitlines()
    ]
    assert len(pairs) == n["pairs"] and all(0.5 <= p["probability"] <= 1 for p in pairs)
    assert 0 <= label["orders_disagree"] <= 1
    # The demo's kind of feedback through the same chat conventions: a verdict per sentence, every
    # principle; the verdict tokens are found by the ChatML tokenizer's offsets.
    const.write_text(
        "principles:\n  - {name: rude, critique_request: 'Rude?', revision_request: Fix it.}\n"
        "  - {name: long, critique_request: 'Too long?', revision_request: Shorten it.}\n"
        "feedback: {mode: critique, principles: all, no_problems: '{sentence} (ok)'}\n"
        "chat: {system: You are kind.}\n"
    )
    label = run_label(
        str(tmp_path / "policy"),
        str(tmp_path / "policy"),
        str(prompts),
        str(const),
        str(tmp_path / "label_critique"),
        LabelSettings(samples_per_prompt=2, sampling=sampling, val_fraction=0.25),
    )
    rows = [json.loads(line) for line in (tmp_path / "label_critique" / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == label["counts"]["pairs"] > 0 and label["orders_disagree"] == 0
    assert all(r["principle"] == "rude+long" and 0 < r["probability"] < 1 for r in rows)


def test_commands_take_a_config_file_and_flags(tmp_path, capsys):
    from rlhf_lightning.cli import cli_main
    from rlhf_lightning.models import load_tokenizer, save_hf

    tok = load_tokenizer(tokenizer_conventions.build("chatml", tmp_path / "tok"))
    save_hf(_eos_prone_chat_model(tok), tok, tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Film {i}?"}) + "\n" for i in range(6)))
    (tmp_path / "c.yaml").write_text(
        "principles:\n  - {name: a, critique_request: C, revision_request: R, choice: Q}\n"
    )
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"constitution: {tmp_path / 'c.yaml'}\nrounds: 1\nsampling: {{max_new_tokens: 8}}\n")
    common = ["-c", str(settings), "--policy", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl")]
    stats = cli_main(["cai-revise", *common, "--out", str(tmp_path / "r"), "--max_prompts", "5"])
    assert stats["counts"]["prompts"] == 5 and stats["settings"]["rounds"] == 1
    assert stats["settings"]["sampling"]["max_new_tokens"] == 8
    settings.write_text(
        f"constitution: {tmp_path / 'c.yaml'}\nsamples_per_prompt: 3\nsampling: {{max_new_tokens: 8}}\n"
    )
    stats = cli_main(["cai-label", *common, "--out", str(tmp_path / "l")])
    assert stats["counts"]["samples"] == 18 and stats["feedback_model"] == str(tmp_path / "policy")
    assert '"pairs"' in capsys.readouterr().out
