"""Tests for the demo task: the gold reward on hand-written cases, the generator, the files."""

import json
import math
import random
import string

import pytest
from transformers import AutoTokenizer

from rlhf_lightning.data import demo
from rlhf_lightning.data.demo import (
    MAX_WORDS,
    TAU,
    generate_demo_task,
    gold_reward,
    gold_reward_batch,
    main,
    sample_response,
    write_demo_data,
)

SIZES = dict(n_sft=2000, n_pairs=400, n_val_pairs=500, n_prompts=300, n_heldout=200)
SMALL = dict(n_sft=200, n_pairs=50, n_val_pairs=50, n_prompts=40, n_heldout=20)
POSITIVE = " I loved it! The acting was wonderful."
NEUTRAL = " I watched it on Sunday with my sister. The film is set in Paris."
NEGATIVE = " I hated it. The script was terrible."


def gold(response: str) -> float:
    return gold_reward("Review of the film I watched last night:", response)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(out, seed=0, **SIZES)


def test_gold_hand_values_and_order():
    # S = loved 2 + wonderful 2 = 4 -> tanh(4 / 2) = tanh(2); no penalty applies.
    assert gold(POSITIVE) == pytest.approx(math.tanh(2.0))
    assert gold(NEUTRAL) == pytest.approx(0.0)  # no lexicon word: tanh(0)
    assert gold(NEGATIVE) == pytest.approx(-math.tanh(2.0))
    # "very" boosts by 1.5: S = 1.5 * good 1 = 1.5 -> tanh(0.75)
    assert gold(" The plot was very good.") == pytest.approx(math.tanh(0.75))
    assert gold(POSITIVE) > gold(NEUTRAL) > gold(NEGATIVE)


def test_negation_flips_and_halves():
    # good = 1 -> tanh(0.5); not good = -0.5 * 1 -> tanh(-0.25)
    assert gold(" The plot was good.") == pytest.approx(math.tanh(0.5))
    assert gold(" The plot was not good.") == pytest.approx(math.tanh(-0.25))
    # terrible = -2 -> tanh(-1); not terrible = -0.5 * -2 = 1 -> tanh(0.5)
    assert gold(" The plot was not terrible.") == pytest.approx(math.tanh(0.5))
    assert gold(" The plot was terrible.") < 0 < gold(" The plot was not terrible.")
    # negation stops at a clause break: "not" does not reach past "but"
    assert gold(" The plot was not bad but the music was good.") == pytest.approx(math.tanh((0.5 + 1) / 2))


def test_empty_is_minus_one():
    for response in ("", " ", "\n\t  "):
        assert gold(response) == -1.0


def test_defects_score_below_the_clean_response():
    clean = gold(POSITIVE)
    defects = {
        "cut off": " I loved it! The acting was wonderful",
        "cut mid-word": " I loved it! The acting was wonderf",
        "looped": POSITIVE + " The acting was wonderful. The acting was wonderful.",
        "looped whole": POSITIVE * 4,
        "stutter": " great great great great great.",
        "stacked words": " I loved it! The acting was wonderful wonderful wonderful.",
        "adjective salad": " Wonderful brilliant superb excellent fantastic gem.",
        "one word": " Wonderful!",
    }
    for name, response in defects.items():
        assert gold(response) < clean - 0.3, name
    assert gold(" I loved it! The acting was wonderful") <= 0.0  # cut-off penalty is strong
    long = (
        " I watched it on Sunday with my sister. The film is set in Paris. The plot was long."
        " The music was loud. It is based on a novel. I saw it at the old theater. It runs for about"
        " two hours. The pacing was quiet. The cast was familiar. The ending was simple. I loved it!"
    )
    assert len(long.split()) > MAX_WORDS
    assert gold(long) < gold(" I loved it!")


def test_gibberish_scores_low():
    rng = random.Random(0)
    chars = string.ascii_letters + string.digits + string.punctuation + "   "
    neutral = gold(NEUTRAL)
    for _ in range(20):
        noise = " " + "".join(rng.choice(chars) for _ in range(rng.randint(5, 80)))
        assert gold(noise) <= neutral
    for response in (
        " Blorp zarg quix the flim.",
        " The acting was wonderfu.",
        " @@@ ### 123.",
        " The acting was wonderful ☃☃☃.",
        " The aktink woz wunderfull!",
    ):
        assert gold(response) <= neutral, response


def test_stacking_saturates():
    one = gold(POSITIVE)
    three = gold(POSITIVE + " What a gem! I would recommend it to everyone.")
    assert 0.9 < one < three <= 1.0
    assert three - one < 0.05  # tanh saturates: more praise buys almost nothing


def test_values_in_range_on_generator_outputs():
    rng = random.Random(1)
    responses = [sample_response(rng) for _ in range(500)]
    defective = [demo._defect(rng, r) for r in responses]
    for r in responses:
        assert r.startswith(" ") and not r.startswith("  ") and r[-1] in ".!"
        assert len(r.split()) <= 30 < MAX_WORDS
    values = gold_reward_batch([""] * 1000, responses + defective)
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert sum(values[500:]) < sum(values[:500])  # defects cost on average
    with pytest.raises(ValueError):
        gold_reward_batch(["a"], ["b", "c"])


def test_determinism(tmp_path):
    write_demo_data(tmp_path / "a", seed=3, **SMALL)
    write_demo_data(tmp_path / "b", seed=3, **SMALL)
    write_demo_data(tmp_path / "c", seed=4, **SMALL)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {
        "sft.jsonl",
        "preferences_train.jsonl",
        "preferences_val.jsonl",
        "prompts_train.jsonl",
        "prompts_heldout.jsonl",
        "summary.json",
        "tokenizer/tokenizer.json",
    }
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for name in ("sft.jsonl", "preferences_train.jsonl", "prompts_heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name


def test_sft_gold_is_mixed_and_summary_is_true(data_dir):
    out, summary = data_dir
    sft = read_jsonl(out / "sft.jsonl")
    assert len(sft) == summary["n_sft"] == SIZES["n_sft"]
    golds = gold_reward_batch([r["prompt"] for r in sft], [r["response"] for r in sft])
    mean = sum(golds) / len(golds)
    assert abs(mean) < 0.2
    assert sum(g > 0.5 for g in golds) > 0.2 * len(golds) and sum(g < -0.5 for g in golds) > 0.2 * len(golds)
    assert summary["sft_gold_mean"] == pytest.approx(mean, abs=1e-4)
    assert 0.3 < summary["sft_gold_std"] < 0.9
    assert json.loads((out / "summary.json").read_text()) == summary


def test_ceiling_matches_monte_carlo(data_dir):
    out, summary = data_dir
    assert summary["tau"] == TAU
    ceiling = summary["preference_ceiling_val"]
    assert 0.75 < ceiling < 0.95
    val = read_jsonl(out / "preferences_val.jsonl")
    assert len(val) == SIZES["n_val_pairs"] and all(r["chosen"] != r["rejected"] for r in val)
    gaps = [gold(r["chosen"]) - gold(r["rejected"]) for r in val]
    # Monte Carlo: redraw Bradley–Terry labels and score the gold reward as the predictor.
    rng, hits, draws = random.Random(0), 0.0, 200
    for _ in range(draws):
        for gap in gaps:
            first_wins = rng.random() < 1 / (1 + math.exp(-gap / TAU))
            hits += 0.5 if gap == 0 else float(first_wins == (gap > 0))
    assert hits / (draws * len(gaps)) == pytest.approx(ceiling, abs=0.01)
    # The labels in the file are one such draw: the gold reward agrees with them about as often.
    realised = sum(0.5 if g == 0 else float(g > 0) for g in gaps) / len(gaps)
    assert realised == pytest.approx(ceiling, abs=0.05)


def test_heldout_prompts_are_disjoint(data_dir):
    out, summary = data_dir
    heldout = {r["prompt"] for r in read_jsonl(out / "prompts_heldout.jsonl")}
    train = {r["prompt"] for r in read_jsonl(out / "prompts_train.jsonl")}
    seen = {
        r["prompt"]
        for name in ("sft", "preferences_train", "preferences_val")
        for r in read_jsonl(out / f"{name}.jsonl")
    } | train
    assert len(heldout) == SIZES["n_heldout"] and len(train) == SIZES["n_prompts"]
    assert not heldout & seen
    opening = lambda p: next(f"{o} {s}" for o in demo.OPENERS for s in demo.SUBJECTS if p.startswith(f"{o} {s} "))  # noqa: E731
    assert not {opening(p) for p in heldout} & {opening(p) for p in seen}
    with pytest.raises(ValueError):
        generate_demo_task(n_prompts=5000)


def test_tokenizer_round_trips_and_joins(data_dir):
    out, summary = data_dir
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.eos_token_id != tok.pad_token_id and tok.bos_token_id not in (tok.eos_token_id, tok.pad_token_id)
    assert len(tok) == summary["tokenizer_vocab_size"]
    assert summary["response_words_single_token"] == summary["response_words"]
    for record in read_jsonl(out / "sft.jsonl")[:50]:
        prompt, response = record["prompt"], record["response"]
        ids = tok(response, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == response
        assert tok.convert_ids_to_tokens(ids)[-1] in (".", "!")  # final punctuation is its own token
        # prompt (with BOS) + response (no specials) == tokenising the joined text
        assert tok(prompt)["input_ids"] + ids == tok(prompt + response)["input_ids"]


def test_main_cli(tmp_path, capsys):
    summary = main(
        [
            "--out",
            str(tmp_path / "d"),
            "--seed",
            "1",
            "--n-sft",
            "100",
            "--n-pairs",
            "20",
            "--n-val-pairs",
            "20",
            "--n-prompts",
            "30",
            "--n-heldout",
            "12",
        ]
    )
    printed = capsys.readouterr().out
    assert '"sft_gold_mean"' in printed and summary["n_sft"] == 100 and summary["seed"] == 1
    assert len(read_jsonl(tmp_path / "d" / "prompts_heldout.jsonl")) == 12
