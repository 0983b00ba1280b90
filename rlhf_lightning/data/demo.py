"""The bundled demo task: synthetic movie-review continuations with a programmatic gold reward.

It mimics the classic controlled-sentiment experiment (IMDb continuations) at a size a tiny
model trained from scratch on a CPU can learn in minutes. A prompt is a review lead-in such as
``"My thoughts on the comedy I watched last night:"``; a response is 1–3 short template
sentences of mixed sentiment, each ending with ``'.'`` or ``'!'``, and **always starts with one
space** (``" The acting was wonderful."``), so ``prompt + response`` is the full text and the data
layer may concatenate the prompt's ids (with BOS) and the response's ids (no specials) directly:
the byte-level pre-tokenizer attaches a word's leading space to the word, so both tokenisations
agree at the seam.

``gold_reward`` stands in for human judgement (sentiment, penalised for defects); preference
pairs are labelled from it with Bradley–Terry noise so a reward model has an honest accuracy
ceiling below 100%. ``write_demo_data`` writes every file the pipeline needs, deterministically.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

from rlhf_lightning.data.demo_grammar import (  # noqa: F401  (part of the demo's namespace)
    ASPECTS,
    AUDIENCES,
    CONTEXTS,
    INTENSIFIERS,
    LEXICON,
    MIXED_TEMPLATES,
    NEG_ADJ,
    NEG_THING,
    NEG_VERB,
    NEUTRAL_ADJ,
    NEUTRAL_FILL,
    NEUTRAL_TEMPLATES,
    NOUNS,
    OBJECTS,
    OPENERS,
    POLAR_TEMPLATES,
    POS_ADJ,
    POS_THING,
    POS_VERB,
    SUBJECTS,
    TONES,
)

# ----------------------------------------------------------------------------- gold reward constants
SENTIMENT_SCALE = 2.0  # sentiment = tanh(S / SENTIMENT_SCALE)
NEGATION = -0.5  # "not good" = -0.5 * good: flips the sign, halves the strength
INTENSITY = 1.5  # "very good" = 1.5 * good (does not compound)
NEGATORS, BOOSTERS = {"not", "never"}, set(INTENSIFIERS)
CLAUSE_BREAKS = {".", "!", ",", "but", "yet"}
PUNCTUATION = {".", "!", ","}
CUT_PENALTY, REPEAT_PENALTY, UNKNOWN_PENALTY, FORM_PENALTY = 1.0, 2.0, 3.0, 1.0
MAX_WORDS, LENGTH_PENALTY = 40, 0.05
TAU = 0.3  # Bradley–Terry temperature of the preference labels
DEFECT_RATE = 0.1  # share of preference responses given a defect (cut off, loop, stutter)
_TOKEN = re.compile(r"[a-z]+|[^\sa-z]")


def _vocabulary() -> frozenset[str]:
    """Every lower-cased word the prompt and response grammars can produce."""
    texts = [
        *OPENERS,
        *SUBJECTS,
        *CONTEXTS,
        *ASPECTS,
        *NOUNS,
        *OBJECTS,
        *AUDIENCES,
        *INTENSIFIERS,
        *NEUTRAL_ADJ,
        *LEXICON,
        *POLAR_TEMPLATES,
        *NEUTRAL_TEMPLATES,
        *MIXED_TEMPLATES,
        *(v for vals in NEUTRAL_FILL.values() for v in vals),
        "a an not",
    ]
    words = {w for t in texts for w in _TOKEN.findall(re.sub(r"\{\w+\}", " ", t).lower())}
    return frozenset(w for w in words if w.isalpha())


VOCABULARY = _vocabulary()


def gold_reward(prompt: str, response: str) -> float:
    """Programmatic judgement of a response, in [-1, 1] (1 best). The prompt is not used.

    Tokens are lower-cased words ``[a-z]+`` and single non-space symbols. Then::

        S     = sum over lexicon words w of LEXICON[w] (+-1 or +-2) * (1.5 if very/really/truly
                precedes it in its clause) * (-0.5 if not/never precedes it in its clause)
                (a clause ends at . ! , but yet; a modifier applies to one lexicon word only)
        cut   = 1 if the response does not end with '.' or '!'           (cut off mid-sentence)
        rep   = max(share of duplicated token trigrams, share of words equal to the previous word)
        unk   = share of tokens that are neither task words nor . ! ,
        form  = share of sentences with fewer than 3 words or more than 2 lexicon words
        extra = max(0, n_words - 40)                                       (MAX_WORDS)
        gold  = clip(tanh(S / 2) - 1.0*cut - 2.0*rep - 3.0*unk - 1.0*form - 0.05*extra, -1, 1)

    and an empty or whitespace-only response scores -1. tanh makes stacked praise saturate,
    so one clean, clearly positive response already scores near the top, while loops, cut-offs,
    unknown words, adjective salads and rambling all cost more than they can gain. Every clean
    generator output has all penalties at 0, so its gold reward is exactly tanh(S / 2).
    """
    if not response.strip():
        return -1.0
    toks = _TOKEN.findall(response.lower())
    words = [t for t in toks if t.isalpha()]
    score, negated, boost = 0.0, False, 1.0
    for t in toks:
        if t in CLAUSE_BREAKS:
            negated, boost = False, 1.0
        elif t in NEGATORS:
            negated = True
        elif t in BOOSTERS:
            boost = INTENSITY
        elif t in LEXICON:
            score += LEXICON[t] * boost * (NEGATION if negated else 1.0)
            negated, boost = False, 1.0
    cut = float(response.rstrip()[-1] not in ".!")
    trigrams = list(zip(toks, toks[1:], toks[2:], strict=False))
    dup = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    stutter = sum(a == b and a.isalpha() for a, b in zip(toks, toks[1:], strict=False)) / max(len(words), 1)
    unk = sum(t not in VOCABULARY and t not in PUNCTUATION for t in toks) / len(toks)
    sentences, current = [], []
    for t in toks:
        current.append(t)
        if t in ".!":
            sentences.append(current)
            current = []
    sentences += [current] if current else []
    bad_form = [sum(w.isalpha() for w in s) < 3 or sum(w in LEXICON for w in s) > 2 for s in sentences]
    form = sum(bad_form) / max(len(sentences), 1)
    extra = max(0, len(words) - MAX_WORDS)
    gold = (
        math.tanh(score / SENTIMENT_SCALE)
        - CUT_PENALTY * cut
        - REPEAT_PENALTY * max(dup, stutter)
        - UNKNOWN_PENALTY * unk
        - FORM_PENALTY * form
        - LENGTH_PENALTY * extra
    )
    return max(-1.0, min(1.0, gold))


def gold_reward_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """``gold_reward`` for each (prompt, response) pair."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


# ----------------------------------------------------------------------------- generator
def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(rng: random.Random, kind: str, used: set[str]) -> str:
    """One sentence of ``kind`` (pos, neg, neutral, mixed); fillers in ``used`` are avoided."""

    def pick(options):
        choice = rng.choice([o for o in options if o not in used] or list(options))
        used.add(choice)
        return choice

    if kind == "neutral":
        template = pick(NEUTRAL_TEMPLATES)
        fill = {k: pick(v) for k, v in NEUTRAL_FILL.items() if "{" + k + "}" in template}
        fill |= {"aspect": pick(ASPECTS), "neutral": pick(NEUTRAL_ADJ)}
        return template.format(**fill) + "."
    if kind == "mixed":
        template = pick(MIXED_TEMPLATES)
        fill = {"aspect": pick(ASPECTS), "aspect2": pick(ASPECTS), "pos": pick(POS_ADJ), "neg": pick(NEG_ADJ)}
        return template.format(**fill) + "."
    good = kind == "pos"
    adj, opp = (POS_ADJ, NEG_ADJ) if good else (NEG_ADJ, POS_ADJ)
    template = pick(POLAR_TEMPLATES)
    boost = pick(INTENSIFIERS) + " " if rng.random() < 0.3 else ""
    fill = {
        "aspect": pick(ASPECTS),
        "int": boost,
        "adj": pick(adj),
        "opp": pick(opp),
        "a_adj": _article(pick(adj)),
        "noun": pick(NOUNS),
        "verb": pick(POS_VERB if good else NEG_VERB),
        "object": pick(OBJECTS),
        "a_thing": _article(pick(POS_THING if good else NEG_THING)),
        "rec": "" if good else "not ",
        "audience": pick(AUDIENCES),
    }
    end = "!" if template.startswith("What") or rng.random() < 0.25 else "."
    return template.format(**fill) + end


def sample_response(rng: random.Random) -> str:
    """A clean response: a tone, then 1–3 sentences of kinds drawn for that tone; leading space."""
    tone = rng.choices(list(TONES), weights=[w for _, w in TONES.values()])[0]
    kinds = TONES[tone][0]
    n = rng.choices((1, 2, 3), weights=(0.2, 0.45, 0.35))[0]
    used: set[str] = set()
    return " " + " ".join(_sentence(rng, rng.choices(list(kinds), list(kinds.values()))[0], used) for _ in range(n))


def _defect(rng: random.Random, response: str) -> str:
    """The failure modes a policy can reach: cut off, a looped sentence, a stuttered word."""
    words = response.split()
    mode = rng.choice(("cut", "loop", "stutter"))
    if mode == "cut":
        kept = words[: max(1, len(words) - rng.randint(0, 2))]
        return " " + " ".join(kept).rstrip(".!")
    if mode == "loop":
        last = re.findall(r"[^.!]+[.!]", response)[-1].strip()
        return response + (" " + last) * rng.randint(1, 3)
    i = rng.randrange(len(words))
    word = words[i].rstrip(".!,")
    return " " + " ".join(words[:i] + [word] * rng.randint(1, 3) + words[i:])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def preference_ceiling(pairs: list[dict], tau: float = TAU) -> float:
    """E[max(p, 1-p)], p = sigmoid((g_a - g_b) / tau): the best accuracy any model can expect."""
    gaps = [gold_reward(r["prompt"], r["chosen"]) - gold_reward(r["prompt"], r["rejected"]) for r in pairs]
    return sum(max(p, 1 - p) for p in (_sigmoid(g / tau) for g in gaps)) / max(len(gaps), 1)


def generate_demo_task(
    seed: int = 0,
    n_sft: int = 8000,
    n_pairs: int = 10000,
    n_val_pairs: int = 1000,
    n_prompts: int = 1000,
    n_heldout: int = 200,
    tau: float = TAU,
    defect_rate: float = DEFECT_RATE,
) -> dict[str, list[dict]]:
    """Generate every record of the demo task with ``random.Random(seed)``.

    Held-out prompts use (opener, subject) combinations that never occur in training prompts.
    SFT responses are clean; a share ``defect_rate`` of preference responses carry a defect.
    The label of a pair (a, b) is drawn with P(a preferred) = sigmoid((g_a - g_b) / tau).

    Returns:
        ``{"sft", "preferences_train", "preferences_val", "prompts_train", "prompts_heldout"}``,
        each a list of JSON-ready records.
    """
    rng = random.Random(seed)
    pairs = [(o, s) for o in OPENERS for s in SUBJECTS]
    rng.shuffle(pairs)
    n_reserved = math.ceil(n_heldout / len(CONTEXTS))
    if n_reserved >= len(pairs) or n_prompts > (len(pairs) - n_reserved) * len(CONTEXTS):
        raise ValueError(f"the prompt grammar cannot give {n_prompts} train and {n_heldout} held-out prompts")
    combos = lambda ps: [f"{o} {s} {c}:" for o, s in ps for c in CONTEXTS]  # noqa: E731
    train_pool, heldout_pool = combos(pairs[n_reserved:]), combos(pairs[:n_reserved])

    def pair_record(prompt: str) -> dict:
        a, b = sample_response(rng), sample_response(rng)
        while b == a:
            b = sample_response(rng)
        a, b = (_defect(rng, r) if rng.random() < defect_rate else r for r in (a, b))
        p_a = _sigmoid((gold_reward(prompt, a) - gold_reward(prompt, b)) / tau)
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    sft = [{"prompt": p, "response": sample_response(rng)} for p in rng.choices(train_pool, k=n_sft)]
    pref_train = [pair_record(p) for p in rng.choices(train_pool, k=n_pairs)]
    pref_val = [pair_record(p) for p in rng.choices(train_pool, k=n_val_pairs)]
    return {
        "sft": sft,
        "preferences_train": pref_train,
        "preferences_val": pref_val,
        "prompts_train": [{"prompt": p} for p in rng.sample(train_pool, n_prompts)],
        "prompts_heldout": [{"prompt": p} for p in rng.sample(heldout_pool, n_heldout)],
    }


def write_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 1024,
    tau: float = TAU,
    extra_sft: list[dict] | None = None,
    **sizes: int,
) -> dict:
    """Write the demo task's JSONL files, its tokenizer and ``summary.json`` under ``out_dir``.

    Args:
        out_dir: destination folder (created).
        seed: drives everything; the same seed gives byte-identical files.
        vocab_size: size of the byte-level BPE tokenizer trained on all prompt + response texts.
        tau: Bradley–Terry temperature of the preference labels.
        extra_sft: SFT records appended to ``sft.jsonl`` and to the tokenizer's corpus (the CAI
            demonstrations of ``demo_cai.py``); None leaves every file as it was.
        **sizes: ``n_sft``, ``n_pairs``, ``n_val_pairs``, ``n_prompts``, ``n_heldout``, ``defect_rate``
            forwarded to :func:`generate_demo_task`.

    Returns:
        The summary: counts, mean/std of the SFT responses' gold reward and their shares above
        and below 0, the preference accuracy ceiling (train and val), tau, seed, vocabulary sizes.
    """
    from rlhf_lightning.data.tokenizer import train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = generate_demo_task(seed=seed, tau=tau, **sizes)
    extra = list(extra_sft or [])
    for name, records in task.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records + (extra if name == "sft" else []))
    texts = [r["prompt"] + r["response"] for r in task["sft"] + extra]
    texts += [
        r["prompt"] + r[k]
        for name in ("preferences_train", "preferences_val")
        for r in task[name]
        for k in ("chosen", "rejected")
    ]
    texts += [r["prompt"] for name in ("prompts_train", "prompts_heldout") for r in task[name]]
    tok = train_tokenizer(texts, vocab_size=vocab_size, out_dir=out / "tokenizer")
    golds = gold_reward_batch([r["prompt"] for r in task["sft"]], [r["response"] for r in task["sft"]])
    mean = sum(golds) / len(golds)
    surface = sorted({w for r in task["sft"] for w in re.findall(r" [A-Za-z]+", r["response"])})
    whole = [w for w in surface if len(tok.encode(w, add_special_tokens=False)) == 1]
    summary = {
        "seed": seed,
        "tau": tau,
        **{f"n_{k}": len(v) for k, v in task.items()},
        "sft_gold_mean": round(mean, 4),
        "sft_gold_std": round(math.sqrt(sum((g - mean) ** 2 for g in golds) / len(golds)), 4),
        "sft_gold_frac_positive": round(sum(g > 0 for g in golds) / len(golds), 4),
        "sft_gold_frac_negative": round(sum(g < 0 for g in golds) / len(golds), 4),
        "preference_ceiling_train": round(preference_ceiling(task["preferences_train"], tau), 4),
        "preference_ceiling_val": round(preference_ceiling(task["preferences_val"], tau), 4),
        "task_words": len(VOCABULARY),
        "tokenizer_vocab_size": len(tok),
        **({"n_extra_sft": len(extra)} if extra else {}),
        "response_words": len(surface),
        "response_words_single_token": len(whole),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """CLI: ``rlhf-lightning demo-data --out data/demo [--seed 0]``; prints the summary."""
    parser = argparse.ArgumentParser(prog="rlhf-lightning demo-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--tau", type=float, default=TAU, help="Bradley–Terry label temperature")
    for name, default in (
        ("n-sft", 8000),
        ("n-pairs", 10000),
        ("n-val-pairs", 1000),
        ("n-prompts", 1000),
        ("n-heldout", 200),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = write_demo_data(
        args.out,
        seed=args.seed,
        vocab_size=args.vocab_size,
        tau=args.tau,
        n_sft=args.n_sft,
        n_pairs=args.n_pairs,
        n_val_pairs=args.n_val_pairs,
        n_prompts=args.n_prompts,
        n_heldout=args.n_heldout,
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return summary


if __name__ == "__main__":
    main()
