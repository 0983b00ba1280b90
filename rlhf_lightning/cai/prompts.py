"""The texts a Constitutional-AI step shows the model: critique, revision and multiple-choice prompts.

Pure functions of strings (and a tokenizer's chat template). A conversation is a list of
``{"role", "content"}`` messages; :func:`render` turns it into the text the model continues, with
the assistant's turn opened:

* through the tokenizer's chat template (``add_generation_prompt=True``; the constitution's
  ``chat.system`` message first) when it has one and ``chat.template`` is ``auto`` or true;
  contents are stripped of surrounding whitespace in both formats (the demo's responses start
  with a space; a chat turn should not);
* otherwise in the plain format, each turn ``"<prefix> <content>"`` joined by ``separator``::

      Human: Review of the film I rented:

      Assistant: The plot was dull.

      Human: Which sentences of your answer are negative?

      Assistant:

The SL-CAI chat for one round is the prompt's messages, the current response, the critique
request (the model writes a critique), then the critique and the revision request (the model
writes a revision); the constitution's few-shot transcripts come first. Each round starts a
fresh chat from the latest revision, so the context does not grow with the rounds.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf_lightning.cai.constitution import ChatFormat, Constitution, FeedbackQuestion, Principle


def uses_chat_template(tokenizer: Any, chat: ChatFormat) -> bool:
    """Whether ``render`` goes through the tokenizer's chat template."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat.template is True and not has:
        raise ValueError("the constitution asks for the chat template (chat.template: true) but the tokenizer has none")
    return has and chat.template in ("auto", True)


def render(messages: list[dict[str, str]], tokenizer: Any, chat: ChatFormat) -> str:
    """``messages`` as the text the model continues, its assistant turn opened (module docstring)."""
    if uses_chat_template(tokenizer, chat):
        head = [{"role": "system", "content": chat.system}] if chat.system else []
        turns = head + [{"role": m["role"], "content": m["content"].strip()} for m in messages]
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    prefix = {"user": chat.human, "assistant": chat.assistant}
    parts = [chat.system] if chat.system else []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip())
        else:
            parts.append(f"{prefix[m['role']]} {m['content'].strip()}")
    return chat.separator.join([*parts, chat.assistant])


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of a prompt record: its ``messages`` (or a list under ``prompt``), else
    the ``prompt`` string as one user turn."""
    value = record.get("messages", record.get("prompt"))
    if isinstance(value, list):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return [{"role": "user", "content": value}]


def _few_shot(constitution: Constitution) -> list[dict[str, str]]:
    return [dict(m) for chat in constitution.few_shot for m in chat]


def critique_messages(
    conversation: list[dict[str, str]], response: str, principle: Principle, constitution: Constitution
) -> list[dict[str, str]]:
    """Few-shot transcripts, the prompt's conversation, the response, the critique request."""
    return [
        *_few_shot(constitution),
        *conversation,
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle.critique_request},
    ]


def revision_messages(
    conversation: list[dict[str, str]], response: str, critique: str, principle: Principle, constitution: Constitution
) -> list[dict[str, str]]:
    """:func:`critique_messages`, then the critique and the revision request."""
    return [
        *critique_messages(conversation, response, principle, constitution),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision_request},
    ]


def critique_prompt(conversation, response, principle, constitution, tokenizer) -> str:
    """The text after which the model writes its critique of ``response`` under ``principle``."""
    return render(critique_messages(conversation, response, principle, constitution), tokenizer, constitution.chat)


def revision_prompt(conversation, response, critique, principle, constitution, tokenizer) -> str:
    """The text after which the model writes its revision of ``response``."""
    messages = revision_messages(conversation, response, critique, principle, constitution)
    return render(messages, tokenizer, constitution.chat)


def question_text(request: str, responses: list[str], principle: Principle, question: FeedbackQuestion) -> str:
    """The user turn of the multiple-choice question: ``question.template`` with ``{prompt}``,
    ``{options}`` (one line ``"<label> <response>"`` per option, in the order given) and ``{choice}``."""
    if len(responses) != len(question.options):
        raise ValueError(f"{len(responses)} responses for {len(question.options)} option labels")
    options = "\n".join(f"{label} {r.strip()}" for label, r in zip(question.options, responses, strict=True))
    return question.template.format(prompt=request.strip(), options=options, choice=principle.choice)


def feedback_prompt(
    request: str, responses: list[str], principle: Principle, constitution: Constitution, tokenizer: Any
) -> str:
    """The text after which the feedback model names an option: the question as the user's turn,
    then the assistant's turn opened with ``answer_prefix``."""
    if not principle.choice:
        raise ValueError(f"principle {principle.name!r} has no AI-feedback question ('choice')")
    question = constitution.feedback
    turn = {"role": "user", "content": question_text(request, responses, principle, question)}
    text = render([turn], tokenizer, constitution.chat)
    if not question.answer_prefix:
        return text
    return text + ("" if not text or text[-1].isspace() else " ") + question.answer_prefix


def option_continuations(question: FeedbackQuestion) -> list[str]:
    """The texts whose probabilities are compared after :func:`feedback_prompt`: ``" " + label``
    (no space when there is no answer prefix: the label then starts the assistant's turn)."""
    return [(" " if question.answer_prefix else "") + label for label in question.options]


def request_text(conversation: list[dict[str, str]]) -> str:
    """The user's request a feedback question quotes: the last user turn of the conversation."""
    users = [m["content"] for m in conversation if m["role"] == "user"]
    return users[-1] if users else ""


_SENTENCE = re.compile(r"[^.!?]*[^.!?\s][^.!?]*[.!?]*|[.!?]+")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: each runs to its closing ``.``, ``!`` or ``?`` (all of a run of
    them), surrounding whitespace stripped; a last sentence without one (cut off) is kept."""
    return [m.group().strip() for m in _SENTENCE.finditer(text) if m.group().strip()]


def no_problem_critique(response: str, no_problems: str) -> tuple[str, list[tuple[int, int]]]:
    """The critique that finds no problem with ``response``, and the character spans of it that a
    judge is scored on. A ``no_problems`` without ``{sentence}`` is that text, scored whole; with
    it, one copy per sentence of the response with the sentence filled in, joined by spaces (the
    demo's ``"The plot was dull. (ok) It was fun. (ok)"``), scored on everything but the copied
    sentences: the verdicts, without their surrounding whitespace (a tokenizer that attaches a
    space to the next word must not have that word scored). A response without a sentence gets
    the template with an empty one, stripped."""
    if "{sentence}" not in no_problems:
        return no_problems, [(0, len(no_problems))]
    head, tail = no_problems.split("{sentence}")
    sentences = split_sentences(response)
    if not sentences:
        text = (head + tail).strip()
        return text, [(0, len(text))]
    text, spans = "", []
    for sentence in sentences:
        if text:
            text += " "
        for part, verdict in ((head, True), (sentence, False), (tail, True)):
            if verdict and part.strip():
                start = len(text) + len(part) - len(part.lstrip())
                spans.append((start, start + len(part.strip())))
            text += part
    return text, spans
