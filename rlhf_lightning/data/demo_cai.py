"""The demo task's Constitutional-AI world: demonstrations that teach a tiny model to critique,
revise and compare reviews under a constitution (opt-in; the plain demo data is unchanged).

A model trained from scratch can only apply a constitution it has learned to read. This module
adds three kinds of SFT demonstration to the demo task, worded exactly as the constitution's
principles ask (so the prompts match :mod:`rlhf_lightning.cai.prompts` at generation time):

* **critique**: a review, a principle's critique request -> every sentence copied with its
  verdict, ``" The plot was dull. (problem) I loved it. (ok)"``, when the constitution's
  ``no_problems`` is per sentence (``"{sentence} (ok)"``); else ``" Problems: <offending
  sentences>"`` or ``" No problems."``. A verdict right after its sentence is a local decision a
  tiny model learns (one "any problem?" answer for the whole review it barely did);
* **revision**: the same chat, the critique, the revision request -> the review with each
  offending sentence rewritten (a negative one replaced by a positive one, a looped one removed,
  a stuttered or unfinished one restored);
* **comparison**: the AI-feedback question on two reviews -> the label of the better one.

What is "offending" comes from the principle's *rule*, applied to the sentence kinds the demo
grammar generated: ``negative`` flags negative and mixed sentences; ``positive`` every sentence
that is not positive; ``defects`` looped, stuttered and unfinished sentences. A comparison under
``negative`` prefers fewer flagged sentences, then more positive sentences; under the others
fewer flagged sentences; a tie is a coin flip. None of this calls the gold reward: the gold
reward judges the outcome only, and the CAI stages' labels come from the trained model applying
the constitution.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import jinja2

from rlhf_lightning.cai.constitution import Constitution, Principle, load_constitution
from rlhf_lightning.cai.prompts import critique_prompt, feedback_prompt, option_continuations, revision_prompt
from rlhf_lightning.data.demo import TONES, _sentence, write_demo_data
from rlhf_lightning.data.tokenizer import CHAT_TEMPLATE

# The rule of each principle of the demo constitution (configs/constitutions/demo.yaml), by name.
RULES = {"negativity": "negative", "harshness": "negative", "enthusiasm": "positive", "defects": "defects"}
DEFECT_RATE = 0.15
# Demonstrations under the defects rule show a fault half the time: at DEFECT_RATE, 85 % of them
# would answer "No problems." and the model would not learn to see a cut or looped sentence.
DEFECTS_RULE_RATE = 0.5


class _DemoTemplate:
    """The demo tokenizer's chat template alone (the tokenizer is trained after these texts exist)."""

    chat_template = CHAT_TEMPLATE

    @staticmethod
    def apply_chat_template(messages, tokenize=False, add_generation_prompt=True):
        return jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


def sample_review(rng: random.Random, defect_rate: float = DEFECT_RATE) -> list[dict[str, Any]]:
    """A review as sentences ``{"text", "kind", "defect", "clean"}``: kinds from the demo grammar's
    tones; with probability ``defect_rate`` one defect (a looped last sentence, a stuttered word,
    an unfinished last sentence), ``clean`` keeping the text before it."""
    tone = rng.choices(list(TONES), weights=[w for _, w in TONES.values()])[0]
    kinds = TONES[tone][0]
    used: set[str] = set()
    sentences = []
    for _ in range(rng.choices((1, 2, 3), weights=(0.2, 0.45, 0.35))[0]):
        kind = rng.choices(list(kinds), list(kinds.values()))[0]
        text = _sentence(rng, kind, used)
        sentences.append({"text": text, "kind": kind, "defect": None, "clean": text})
    if rng.random() < defect_rate:
        last = sentences[-1]
        mode = rng.choice(("loop", "stutter", "cut"))
        if mode == "loop":
            sentences += [{**last, "defect": "loop"} for _ in range(rng.randint(1, 2))]
        elif mode == "stutter":
            words = last["text"].split()
            i = rng.randrange(len(words) - 1)
            last["text"] = " ".join(words[: i + 1] + [words[i].rstrip(",")] + words[i + 1 :])
            last["defect"] = "stutter"
        elif len(last["text"].split()) > 3:
            last["text"] = " ".join(last["text"].split()[: -rng.randint(1, 2)])
            last["defect"] = "cut"
    return sentences


def review_text(sentences: list[dict[str, Any]]) -> str:
    return " " + " ".join(s["text"] for s in sentences)


def offending(sentences: list[dict[str, Any]], rule: str) -> list[int]:
    """Indices of the sentences the rule flags (module docstring)."""
    if rule == "negative":
        return [i for i, s in enumerate(sentences) if s["kind"] in ("neg", "mixed")]
    if rule == "positive":
        return [i for i, s in enumerate(sentences) if s["kind"] != "pos"]
    if rule == "defects":
        return [i for i, s in enumerate(sentences) if s["defect"]]
    raise ValueError(f"unknown rule {rule!r}")


FLAGGED = "{sentence} (problem)"  # a flagged sentence in a per-sentence critique


def critique_text(sentences: list[dict[str, Any]], rule: str, no_problems: str | None = None) -> str:
    """The critique of a review under the rule. With a per-sentence ``no_problems`` template (the
    constitution's, e.g. ``"{sentence} (ok)"``) every sentence is copied with its verdict, the
    flagged ones as ``FLAGGED``; otherwise ``" Problems: <flagged sentences>"`` or ``" No problems."``."""
    bad = offending(sentences, rule)
    if no_problems and "{sentence}" in no_problems:
        verdicts = [FLAGGED if i in bad else no_problems for i in range(len(sentences))]
        return " " + " ".join(v.replace("{sentence}", s["text"]) for v, s in zip(verdicts, sentences, strict=True))
    return " Problems: " + " ".join(sentences[i]["text"] for i in bad) if bad else " No problems."


def revision_text(sentences: list[dict[str, Any]], rule: str, rng: random.Random) -> str:
    bad, used = set(offending(sentences, rule)), {s["text"] for s in sentences}
    out = []
    for i, s in enumerate(sentences):
        if i not in bad:
            out.append(s["text"])
        elif rule in ("negative", "positive"):
            out.append(_sentence(rng, "pos", used))
        elif s["defect"] != "loop":
            out.append(s["clean"])
    return " " + " ".join(out)


def preference_key(sentences: list[dict[str, Any]], rule: str) -> tuple[int, ...]:
    """Larger is better under the rule: (-flagged, positive sentences) or (-flagged,)."""
    flagged = -len(offending(sentences, rule))
    if rule == "negative":
        return flagged, sum(s["kind"] == "pos" and not s["defect"] for s in sentences)
    return (flagged,)


def _rule(principle: Principle) -> str:
    if principle.name not in RULES:
        raise ValueError(f"the demo knows the principles {sorted(RULES)}, not {principle.name!r}")
    return RULES[principle.name]


def cai_demonstrations(
    constitution: Constitution,
    prompts: list[str],
    seed: int = 0,
    n_critique: int = 2000,
    n_revision: int = 2000,
    n_comparison: int = 2000,
    tokenizer: Any = None,
    revise_faulty: float = 0.8,
) -> list[dict[str, str]]:
    """SFT records ``{prompt, response}`` teaching the three skills on prompts drawn from ``prompts``;
    ``revise_faulty``: each review of a revision demonstration without a fault is redrawn with
    this probability."""
    rng = random.Random(f"cai-demo-{seed}")
    tok = tokenizer or _DemoTemplate()
    out = []
    for n in range(n_critique + n_revision):
        principle, prompt = rng.choice(constitution.principles), rng.choice(prompts)
        rule = _rule(principle)
        rate = DEFECTS_RULE_RATE if rule == "defects" else DEFECT_RATE
        sentences = sample_review(rng, rate)
        # Revisions are shown mostly on reviews the principle finds fault with: a revision that
        # only repeats its review teaches little.
        while n >= n_critique and not offending(sentences, rule) and rng.random() < revise_faulty:
            sentences = sample_review(rng, rate)
        chat, response = [{"role": "user", "content": prompt}], review_text(sentences)
        critique = critique_text(sentences, rule, constitution.feedback.no_problems)
        if n < n_critique:
            out.append({"prompt": critique_prompt(chat, response, principle, constitution, tok), "response": critique})
        else:
            ask = revision_prompt(chat, response, critique, principle, constitution, tok)
            out.append({"prompt": ask, "response": revision_text(sentences, rule, rng)})
    labels = option_continuations(constitution.feedback)
    choices = constitution.choice_principles
    for _ in range(n_comparison if choices else 0):
        principle, prompt = rng.choice(choices), rng.choice(prompts)
        rule = _rule(principle)
        a, b = sample_review(rng), sample_review(rng)
        ka, kb = preference_key(a, rule), preference_key(b, rule)
        first = ka > kb if ka != kb else rng.random() < 0.5
        ask = feedback_prompt(prompt, [review_text(a), review_text(b)], principle, constitution, tok)
        out.append({"prompt": ask, "response": labels[0 if first else 1]})
    return out


def write_cai_demo_data(
    out_dir: str | Path,
    constitution: str | Path,
    seed: int = 0,
    n_critique: int = 2000,
    n_revision: int = 2000,
    n_comparison: int = 2000,
    revise_faulty: float = 0.8,
    **demo_args: Any,
) -> dict:
    """The demo task (``write_demo_data`` with ``demo_args``) with the CAI demonstrations added to
    its SFT file (and to the tokenizer's corpus); returns the summary."""
    from rlhf_lightning.data.demo import generate_demo_task

    sizes = {k: v for k, v in demo_args.items() if k.startswith("n_")}
    prompts = [r["prompt"] for r in generate_demo_task(seed=seed, **sizes)["prompts_train"]]
    const = load_constitution(constitution)
    demos = cai_demonstrations(const, prompts, seed, n_critique, n_revision, n_comparison, None, revise_faulty)
    return write_demo_data(out_dir, seed=seed, extra_sft=demos, **demo_args)
