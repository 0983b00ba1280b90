"""Evaluation: metrics by hand, sample_and_score against naive loops, policy comparison end to end."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from rlhf_lightning.data.collate import PromptCollator, tokenize_prompt
from rlhf_lightning.data.demo import gold_reward
from rlhf_lightning.data.records import PromptExample
from rlhf_lightning.eval import (
    METRIC_COLUMNS,
    aggregate_metrics,
    distinct_n,
    evaluate_policies,
    format_table,
    sample_and_score,
    summarize,
    training_eval_metrics,
    win_rate,
)
from rlhf_lightning.eval.evaluate import main as evaluate_main
from rlhf_lightning.generation import SamplingConfig, sample_responses
from rlhf_lightning.models import build_reward_model, load_causal_lm
from tests.conftest import TINY_MODEL_CONFIG

DEMO_GOLD = "rlhf_lightning.data.demo:gold_reward"


# ----------------------------------------------------------------------------- pure metrics


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b | a c -> 6 in all, unique {a, b, c} = 3 -> 3/6
    assert distinct_n(texts, 1) == pytest.approx(0.5)
    # bigrams: (a b) (b a) (a b) | (a c) -> 4 in all, unique {ab, ba, ac} = 3 -> 3/4 (none crosses texts)
    assert distinct_n(texts, 2) == pytest.approx(0.75)
    # trigrams: (a b a) (b a b) | none -> 2/2
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["", "one"], 2) == 0.0  # no bigram at all


def test_win_rate_by_hand():
    # prompt 1: 2 > 1 -> 1; prompt 2: 0 == 0 -> 0.5; prompt 3: -1 < 3 -> 0; prompt 4: 5 > 4 -> 1
    # mean = (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert win_rate([2, 0, -1, 5], [1, 0, 3, 4]) == pytest.approx(0.625)
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_summarize_by_hand():
    s = summarize([4, 1, 3, 2])
    # mean 2.5; population var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert s["mean"] == pytest.approx(2.5) and s["std"] == pytest.approx(math.sqrt(1.25))
    # sorted 1 2 3 4, linear interpolation at (n-1)q = 3q: q10 -> 1.3, q50 -> 2.5, q90 -> 3.7
    assert (s["q10"], s["q25"], s["q50"], s["q75"], s["q90"]) == pytest.approx((1.3, 1.75, 2.5, 3.25, 3.7))


def _records(policy, responses, kls):
    return [
        {
            "policy": policy,
            "index": i,
            "prompt": f"p{i}",
            "response": r,
            "gold": gold_reward(f"p{i}", r),
            "proxy": float(len(r)),
            "kl": k,
            "length": len(r.split()) + 1,
            "ended": True,
        }
        for i, (r, k) in enumerate(zip(responses, kls, strict=True))
    ]


def test_aggregate_metrics_known_win_rate():
    sft = ["The script was clever.", "The acting was terrible.", "It runs for about two hours.", "The ending was dull."]
    ppo = [
        "The acting was wonderful.",
        "The ending was dull.",
        "It runs for about two hours.",
        "The acting was terrible.",
    ]
    # gold (tanh(S/2), no penalty): sft 0.462, -0.762, 0.0, -0.462; ppo 0.762, -0.462, 0.0, -0.762
    # ppo vs sft per prompt: win, win, tie, loss -> (1 + 1 + 0.5 + 0) / 4 = 0.625
    records = _records("ppo", ppo, [1.0, 2.0, 0.0, 3.0]) + _records("sft", sft, [0.0] * 4)
    m = aggregate_metrics(records, baseline="sft")
    assert list(m) == ["ppo", "sft"]  # order of first appearance
    assert m["ppo"]["win_rate_vs_sft_gold"] == pytest.approx(0.625)
    assert m["sft"]["win_rate_vs_sft_gold"] == 0.5 and m["sft"]["win_rate_vs_sft_proxy"] == 0.5
    # proxy = characters: 25 > 22, 20 < 24, 28 == 28, 24 > 20 -> (1 + 0 + 0.5 + 1) / 4 = 0.625
    assert m["ppo"]["win_rate_vs_sft_proxy"] == pytest.approx(0.625)
    t = math.tanh(0.5)  # one +-1 lexicon word: tanh(1/2) = 0.462; one +-2 word: tanh(1) = 0.762
    assert m["ppo"]["gold_reward_mean"] == pytest.approx((math.tanh(1) - t + 0 - math.tanh(1)) / 4)
    assert m["ppo"]["kl_to_ref"] == pytest.approx(1.5)  # (1 + 2 + 0 + 3) / 4
    assert m["ppo"]["n_samples"] == 4 and m["ppo"]["eos_rate"] == 1.0
    assert set(m["ppo"]["gold_reward_quantiles"]) == {"q10", "q25", "q50", "q75", "q90"}
    # Without a baseline among the records: no win rates, the rest unchanged.
    assert not any(k.startswith("win_rate") for k in aggregate_metrics(records, baseline="dpo")["ppo"])


def test_aggregate_metrics_without_reference_or_scores():
    rows = [
        {"policy": "dpo", "index": i, "response": "a b", "length": 3, "ended": i == 0, "kl": None, "proxy": None}
        for i in range(2)
    ]
    m = aggregate_metrics(rows)["dpo"]
    assert not {"kl_to_ref", "proxy_reward_mean", "gold_reward_mean"} & set(m)  # nothing measured is invented
    assert m["eos_rate"] == 0.5 and m["response_length_mean"] == 3.0


def test_training_eval_metrics_by_hand():
    rows = [
        {"length": 4, "ended": True, "kl": 0.5, "proxy": 1.0, "gold": 0.2},
        {"length": 2, "ended": False, "kl": 1.5, "proxy": -3.0, "gold": 0.4},
    ]
    # means over 2 samples: proxy (1 - 3) / 2 = -1, kl (0.5 + 1.5) / 2 = 1, length 3, eos 1/2, gold 0.3
    assert training_eval_metrics(rows) == pytest.approx(
        {
            "eval/proxy_reward": -1.0,
            "eval/kl": 1.0,
            "eval/response_length": 3.0,
            "eval/eos_rate": 0.5,
            "eval/gold_reward": 0.3,
        }
    )
    for r in rows:
        r["kl"] = r["proxy"] = None
        del r["gold"]
    assert set(training_eval_metrics(rows)) == {"eval/response_length", "eval/eos_rate"}
    assert training_eval_metrics([]) == {}


def test_format_table_uses_the_one_column_list():
    metrics = {
        "sft": {"gold_reward_mean": 0.1, "gold_reward_std": 0.2, "kl_to_ref": 0.0, "n_samples": 3},
        "ppo": {"gold_reward_mean": 0.5, "gold_reward_std": 0.1, "win_rate_vs_sft_gold": 0.75, "n_samples": 3},
    }
    header, sft, ppo = (line.split() for line in format_table(metrics, "sft").splitlines())
    # METRIC_COLUMNS order, only the columns some policy has; the std beside its column.
    assert header == ["policy", "gold", "gold_sd", "KL", "win/sft", "n"]
    assert sft == ["sft", "0.100", "0.200", "0.000", "-", "3"]
    assert ppo == ["ppo", "0.500", "0.100", "-", "0.750", "3"]
    assert [c.key for c in METRIC_COLUMNS].count("kl_to_ref") == 1


# ----------------------------------------------------------------------------- sampling and scoring


PROMPTS = ["The movie was", "I hated this film", "Review: a fine story with a few"]


@pytest.fixture()
def prompt_batch(tokenizer):
    features = [tokenize_prompt(PromptExample(p), tokenizer, 16) for p in PROMPTS]
    return PromptCollator(tokenizer.pad_token_id)(features)


def _tiny(tokenizer, seed):
    torch.manual_seed(seed)
    return load_causal_lm(None, tokenizer, model_config=dict(TINY_MODEL_CONFIG)).eval()


def naive_response_logp(model, query: list[int], response: list[int], temperature: float) -> float:
    """Sum of log p(response_t | query, response_<t) for ONE unpadded sequence, from the full logits."""
    ids = torch.tensor([query + response])
    logits = model(input_ids=ids).logits[0] / temperature  # (T, V)
    logp = logits.log_softmax(-1)
    return sum(logp[len(query) + t - 1, tok].item() for t, tok in enumerate(response))


def test_sample_and_score_policy_is_reference_gives_exactly_zero_kl(tiny_lm, tokenizer, prompt_batch):
    sampling = SamplingConfig(max_new_tokens=6)
    torch.manual_seed(0)
    rows = sample_and_score(tiny_lm, tiny_lm, None, tokenizer, prompt_batch, sampling)
    assert [r["kl"] for r in rows] == [0.0] * len(PROMPTS)
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["proxy"] is None for r in rows)
    # Without a reference there is no KL at all.
    torch.manual_seed(0)
    assert all(r["kl"] is None for r in sample_and_score(tiny_lm, None, None, tokenizer, prompt_batch, sampling))


def test_sample_and_score_matches_naive_loops(tokenizer, prompt_batch):
    policy, reference = _tiny(tokenizer, 0).train(), _tiny(tokenizer, 1)
    rm = build_reward_model(None, tokenizer, model_config=dict(TINY_MODEL_CONFIG)).eval()
    sampling, temperature = SamplingConfig(max_new_tokens=6, temperature=1.3), 0.7

    torch.manual_seed(3)
    gen = sample_responses(
        policy,
        prompt_batch["input_ids"],
        prompt_batch["attention_mask"],
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        sampling,
    )
    after_sampling = torch.get_rng_state()
    torch.manual_seed(3)
    rows = sample_and_score(policy, reference, rm, tokenizer, prompt_batch, sampling, temperature=temperature)
    # One sample_responses call and nothing else draws random numbers.
    assert torch.equal(torch.get_rng_state(), after_sampling)
    assert policy.training  # eval mode for the scoring passes only

    ids = torch.cat([prompt_batch["input_ids"], gen.response_ids], 1)  # (B, Q+A)
    mask = torch.cat([prompt_batch["attention_mask"], gen.response_mask], 1)  # (B, Q+A)
    proxy = rm(ids, mask).tolist()
    policy.eval()
    with torch.no_grad():
        for b, row in enumerate(rows):
            query = prompt_batch["input_ids"][b][prompt_batch["attention_mask"][b].bool()].tolist()
            response = gen.response_ids[b][gen.response_mask[b].bool()].tolist()
            kl = naive_response_logp(policy, query, response, temperature) - naive_response_logp(
                reference, query, response, temperature
            )
            assert row["kl"] == pytest.approx(kl, abs=1e-4)
            assert row["length"] == len(response) and row["ended"] == bool(gen.ended[b])
            assert row["proxy"] == pytest.approx(proxy[b])


# ----------------------------------------------------------------------------- end to end


def test_evaluate_policies_end_to_end(demo_workspace, tmp_path):
    ws = demo_workspace
    sft = str(ws / "runs/demo/sft/hf")
    copy = shutil.copytree(sft, tmp_path / "copy")  # same weights, another path: loaded separately
    result = evaluate_policies(
        {"sft": sft, "copy": str(copy)},
        str(ws / "data/demo/prompts_heldout.jsonl"),
        reference=sft,
        reward_model=str(ws / "runs/demo/reward/hf"),
        gold_reward=DEMO_GOLD,
        sampling=SamplingConfig(max_new_tokens=8),
        batch_size=4,
        max_prompts=6,
        out_dir=str(tmp_path / "eval"),
    )
    m = result["policies"]
    assert m["sft"]["kl_to_ref"] == 0.0  # the reference itself: exactly 0
    assert abs(m["copy"]["kl_to_ref"]) < 1e-4
    assert m["sft"]["win_rate_vs_sft_gold"] == 0.5 and m["sft"]["win_rate_vs_sft_proxy"] == 0.5
    for name in ("sft", "copy"):
        assert m[name]["n_samples"] == 6
        for key in (
            "gold_reward_mean",
            "gold_reward_std",
            "gold_reward_quantiles",
            "proxy_reward_mean",
            "eos_rate",
            "response_length_mean",
            "distinct_1",
            "distinct_2",
            "win_rate_vs_sft_gold",
        ):
            assert key in m[name], key
    saved = json.loads((tmp_path / "eval/eval.json").read_text())
    assert set(saved) == {"policies", "settings"} and set(saved["policies"]) == {"sft", "copy"}
    assert saved["settings"]["sampling"]["max_new_tokens"] == 8
    rows = [json.loads(line) for line in (tmp_path / "eval/eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"policy", "prompt", "response", "gold", "proxy", "kl"} <= set(rows[0])
    # Same seed, same weights: the same sample for every prompt.
    by = {(r["policy"], r["index"]): r["response"] for r in rows}
    assert all(by[("sft", i)] == by[("copy", i)] for i in range(6))


def test_evaluate_cli(demo_workspace, tmp_path, capsys):
    # `rlhf-lightning evaluate ARGS` calls rlhf_lightning.eval.evaluate.main(ARGS).
    ws = demo_workspace
    sft = str(ws / "runs/demo/sft/hf")
    result = evaluate_main(
        [
            "--policy",
            f"sft={sft}",
            "--reference",
            sft,
            "--prompts",
            str(ws / "data/demo/prompts_heldout.jsonl"),
            "--gold_reward",
            "none",
            "--max_prompts",
            "2",
            "--max_new_tokens",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert "gold_reward_mean" not in result["policies"]["sft"] and (tmp_path / "eval.json").is_file()
    assert "policy" in capsys.readouterr().out
    # No gold reward unless one is named; named, it is used.
    common = [
        "--policy",
        f"sft={sft}",
        "--reference",
        sft,
        "--prompts",
        str(ws / "data/demo/prompts_heldout.jsonl"),
        "--max_prompts",
        "2",
        "--max_new_tokens",
        "4",
    ]
    assert "gold_reward_mean" not in evaluate_main(common)["policies"]["sft"]
    assert "gold_reward_mean" in evaluate_main(common + ["--gold_reward", DEMO_GOLD])["policies"]["sft"]
