"""The critique, revision and multiple-choice prompts, built exactly: golden strings in the plain
format, through a ChatML template with a system role, and through the demo tokenizer's template."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rlhf_lightning.cai import ChatFormat, Constitution, FeedbackQuestion, Principle
from rlhf_lightning.cai.prompts import (
    critique_prompt,
    feedback_prompt,
    option_continuations,
    prompt_messages,
    render,
    revision_prompt,
)
from tests import tokenizer_conventions

P = Principle("rude", "Is your answer rude?", "Make it polite.", "Which is more polite?")
CONST = Constitution((P,), chat=ChatFormat(template=False))
CHAT = [{"role": "user", "content": "Tell me about the film."}]


class NoTemplate:
    chat_template = None


def test_plain_critique_and_revision_prompts():
    # The response's leading space (the demo's convention) is stripped inside the transcript.
    assert critique_prompt(CHAT, " It was bad.", P, CONST, NoTemplate()) == (
        "Human: Tell me about the film.\n\nAssistant: It was bad.\n\nHuman: Is your answer rude?\n\nAssistant:"
    )
    assert revision_prompt(CHAT, " It was bad.", " Yes: bad.", P, CONST, NoTemplate()) == (
        "Human: Tell me about the film.\n\nAssistant: It was bad.\n\nHuman: Is your answer rude?"
        "\n\nAssistant: Yes: bad.\n\nHuman: Make it polite.\n\nAssistant:"
    )


def test_plain_format_is_configurable_and_few_shot_comes_first():
    shot = ({"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"})
    const = Constitution(
        (P,),
        few_shot=(shot,),
        chat=ChatFormat(template=False, system="Be kind.", human="U:", assistant="B:", separator="\n"),
    )
    assert critique_prompt(CHAT, "x", P, const, NoTemplate()) == (
        "Be kind.\nU: Q\nB: A\nU: Tell me about the film.\nB: x\nU: Is your answer rude?\nB:"
    )


def test_chat_template_with_system_role(tmp_path):
    from rlhf_lightning.models import load_tokenizer

    tok = load_tokenizer(tokenizer_conventions.build("chatml", tmp_path / "chatml"))
    const = replace(CONST, chat=ChatFormat(system="You are kind."))
    assert critique_prompt(CHAT, "It was bad.", P, const, tok) == (
        "<|im_start|>system\nYou are kind.<|im_end|>\n"
        "<|im_start|>user\nTell me about the film.<|im_end|>\n"
        "<|im_start|>assistant\nIt was bad.<|im_end|>\n"
        "<|im_start|>user\nIs your answer rude?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert revision_prompt(CHAT, "It was bad.", "Rude.", P, const, tok).endswith(
        "<|im_start|>assistant\nRude.<|im_end|>\n<|im_start|>user\nMake it polite.<|im_end|>\n<|im_start|>assistant\n"
    )
    # template: false forces the plain format even when the tokenizer has a template
    assert render(CHAT, tok, ChatFormat(template=False)) == "Human: Tell me about the film.\n\nAssistant:"
    with pytest.raises(ValueError, match="tokenizer has none"):
        render(CHAT, NoTemplate(), ChatFormat(template=True))


def test_feedback_prompt_and_options(tmp_path):
    from rlhf_lightning.models import load_tokenizer

    q = FeedbackQuestion("Request: {prompt}\n{choice}\n{options}", ("(A)", "(B)"), "The answer is:")
    const = Constitution((P,), feedback=q, chat=ChatFormat(template=False))
    assert feedback_prompt("Hi?", [" one.", "two."], P, const, NoTemplate()) == (
        "Human: Request: Hi?\nWhich is more polite?\n(A) one.\n(B) two.\n\nAssistant: The answer is:"
    )
    assert option_continuations(q) == [" (A)", " (B)"]
    tok = load_tokenizer(tokenizer_conventions.build("chatml", tmp_path / "chatml"))
    chat_const = replace(const, chat=ChatFormat())
    assert feedback_prompt("Hi?", ["one.", "two."], P, chat_const, tok) == (
        "<|im_start|>user\nRequest: Hi?\nWhich is more polite?\n(A) one.\n(B) two.<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is:"
    )
    # no answer prefix: the label starts the assistant's turn
    bare = replace(const, feedback=replace(q, answer_prefix=""))
    assert feedback_prompt("Hi?", ["one.", "two."], P, bare, NoTemplate()).endswith("(B) two.\n\nAssistant:")
    assert option_continuations(bare.feedback) == ["(A)", "(B)"]
    with pytest.raises(ValueError, match="3 responses for 2 option labels"):
        feedback_prompt("Hi?", ["a", "b", "c"], P, const, NoTemplate())


def test_prompt_messages_of_records():
    assert prompt_messages({"prompt": "Hi"}) == [{"role": "user", "content": "Hi"}]
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert prompt_messages({"messages": msgs}) == msgs


def test_demo_demonstrations_use_the_prompts_the_stages_build(tmp_path):
    """The CAI demonstrations are rendered with the demo tokenizer's template before the tokenizer
    exists; they must equal what the stages render with the trained tokenizer."""
    from rlhf_lightning.cai import load_constitution
    from rlhf_lightning.data.demo_cai import _DemoTemplate, cai_demonstrations
    from rlhf_lightning.data.tokenizer import train_tokenizer

    const = load_constitution("configs/constitution_demo.yaml")
    tok = train_tokenizer(["Review of the film: It was good."] * 5, vocab_size=300, min_frequency=1)
    principle = const.principles[0]
    args = ([{"role": "user", "content": "Review of X:"}], " It was dull.", principle, const)
    assert (
        critique_prompt(*args, _DemoTemplate())
        == critique_prompt(*args, tok)
        == (
            "user: Review of X:\nassistant: It was dull.\n"
            "user: Which sentences of your review are negative?\nassistant:"
        )
    )
    demos = cai_demonstrations(const, ["Review of X:"], seed=0, n_critique=3, n_revision=3, n_comparison=3)
    assert len(demos) == 9 and all(d["prompt"].endswith("assistant:") for d in demos)
    assert {d["response"] for d in demos[6:]} <= {"(A)", "(B)"}
    assert all(d["response"].startswith(" ") for d in demos[:6])
    again = cai_demonstrations(const, ["Review of X:"], seed=0, n_critique=3, n_revision=3, n_comparison=3)
    assert again == demos


def test_split_sentences_and_the_per_sentence_no_problem_critique():
    from rlhf_lightning.cai.prompts import no_problem_critique, split_sentences

    assert split_sentences(" The plot was dull. I loved it!  It is based on a") == [
        "The plot was dull.",
        "I loved it!",
        "It is based on a",
    ]
    assert split_sentences("Wow!! Really? ok") == ["Wow!!", "Really?", "ok"]
    assert split_sentences("   ") == [] and split_sentences(" . ") == ["."]
    text, spans = no_problem_critique(" The plot was dull. It is", "{sentence} (ok)")
    assert text == "The plot was dull. (ok) It is (ok)"
    assert [text[a:b] for a, b in spans] == ["(ok)", "(ok)"]  # the verdicts, not the copies or spaces
    text, spans = no_problem_critique("Fine. Great.", "- {sentence}: fine;")
    assert text == "- Fine.: fine; - Great.: fine;"
    assert [text[a:b] for a, b in spans] == ["-", ": fine;", "-", ": fine;"]
    assert no_problem_critique("", "{sentence} (ok)") == ("(ok)", [(0, 4)])  # nothing to copy
    assert no_problem_critique("  ", "(ok) {sentence}") == ("(ok)", [(0, 4)])
    assert no_problem_critique("Any.", "No problems.") == ("No problems.", [(0, 12)])


def test_demo_critiques_are_what_the_judge_scores():
    """A demo critique of a review without a fault is, token for token, the per-sentence
    no-problem critique the feedback scores; a flagged sentence differs only in its verdict."""
    import random

    from rlhf_lightning.cai.prompts import no_problem_critique
    from rlhf_lightning.data.demo_cai import critique_text, review_text, sample_review

    rng = random.Random(1)
    for _ in range(200):
        sentences = sample_review(rng, defect_rate=0.5)
        ok, _ = no_problem_critique(review_text(sentences), "{sentence} (ok)")
        if not any(s["defect"] for s in sentences):
            assert critique_text(sentences, "defects", "{sentence} (ok)") == " " + ok
        flagged = critique_text(sentences, "positive", "{sentence} (ok)")
        assert flagged.count("(problem)") == sum(s["kind"] != "pos" for s in sentences)
        assert flagged.replace("(problem)", "(ok)") == " " + ok
    bad = [{"text": "It was bad.", "kind": "neg", "defect": None}]
    assert critique_text(bad, "negative") == " Problems: It was bad."
