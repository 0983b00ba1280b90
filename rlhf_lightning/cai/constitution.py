"""Constitution files: the principles that SL-CAI critiques and revises under, and the AI-feedback question.

A constitution is a YAML or JSON file (JSON is read as YAML, so both give line numbers)::

    principles:                      # at least one
      - name: negativity
        critique_request: "Which sentences of your answer are negative?"
        revision_request: "Rewrite your answer without the negative sentences."
        choice: "Which answer is less negative?"      # optional: the AI-feedback question
    few_shot:                        # optional: transcripts put before every critique/revision chat
      - [{role: user, content: ...}, {role: assistant, content: ...}, ...]
    feedback:                        # optional (defaults below)
      mode: choice                   # choice: the multiple-choice question; critique: see below
      principles: one                # one: a principle drawn per pair (the paper); all: every principle
      template: "{prompt}\\n{options}\\n{choice}"   # the user turn of the multiple-choice question
      options: ["(A)", "(B)"]        # option labels; the label is scored after answer_prefix + " "
      answer_prefix: "The answer is:"
      no_problems: null              # critique mode: the critique that finds nothing, e.g. "No problems.";
                                     # with {sentence}, one verdict per sentence: "{sentence} (ok)"
    chat:                            # optional: how a conversation becomes text
      template: auto                 # auto: the tokenizer's chat template when it has one; true; false
      system: null                   # a system message (chat templates only)
      human: "Human:"                # the plain format: "Human: ...<sep>Assistant: ..."
      assistant: "Assistant:"
      separator: "\\n\\n"

Every problem is reported as ``file:line: problem`` naming the key: a missing field, an empty
list or string, a key the schema does not know, a value of the wrong type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROLES = ("system", "user", "assistant")


class ConstitutionError(ValueError):
    """A constitution that cannot be used; the message is ``file:line: problem``."""


@dataclass(frozen=True)
class Principle:
    """One principle: the critique and revision requests of SL-CAI and, optionally, the
    multiple-choice question (``choice``) the AI-feedback model answers under it."""

    name: str
    critique_request: str
    revision_request: str
    choice: str | None = None


@dataclass(frozen=True)
class FeedbackQuestion:
    """The wording of the AI feedback (see the module docstring). ``mode="choice"`` asks the
    multiple-choice question; ``mode="critique"`` scores each response alone by the probability
    that its critique under the principle is ``no_problems`` (see ``cai/feedback.py``).
    ``principles="one"`` judges each pair under one principle drawn at random (Bai et al.);
    ``"all"`` under every principle at once (``cai/feedback.py`` says how they combine)."""

    template: str = "{prompt}\n{options}\n{choice}"
    options: tuple[str, ...] = ("(A)", "(B)")
    answer_prefix: str = "The answer is:"
    mode: str = "choice"
    no_problems: str | None = None
    principles: str = "one"


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation becomes text: the tokenizer's chat template (``template``: ``"auto"``
    uses it when there is one), else the plain ``Human: ...`` / ``Assistant: ...`` format."""

    template: str | bool = "auto"
    system: str | None = None
    human: str = "Human:"
    assistant: str = "Assistant:"
    separator: str = "\n\n"


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    few_shot: tuple[tuple[dict[str, str], ...], ...] = ()
    feedback: FeedbackQuestion = field(default_factory=FeedbackQuestion)
    chat: ChatFormat = field(default_factory=ChatFormat)
    name: str = "constitution"

    @property
    def choice_principles(self) -> tuple[Principle, ...]:
        """The principles AI feedback draws from: those with a question (``choice`` mode), or all."""
        if self.feedback.mode == "critique":
            return self.principles
        return tuple(p for p in self.principles if p.choice)


# ----------------------------------------------------------------------------- YAML with line numbers


def _plain(node: yaml.Node, lines: dict[tuple, int], path: tuple) -> Any:
    """The Python value of a composed YAML ``node``; ``lines[path]`` = 1-based line of every value."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            out[key] = _plain(value_node, lines, (*path, key))
            lines[(*path, key)] = key_node.start_mark.line + 1  # a key's own line, not its value's
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v, lines, (*path, i)) for i, v in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


class _Checker:
    def __init__(self, file: str, lines: dict[tuple, int]):
        self.file, self.lines = file, lines

    def fail(self, path: tuple, problem: str) -> None:
        at = path
        while at and at not in self.lines:
            at = at[:-1]
        where = ".".join(str(p) for p in path) or "(top level)"
        raise ConstitutionError(f"{self.file}:{self.lines.get(at, 1)}: {where}: {problem}")

    def mapping(self, value: Any, path: tuple, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping with keys {list(required + optional)}, got {type(value).__name__}")
        for key in value:
            if key not in required + optional:
                self.fail((*path, key), f"unknown key {key!r} (known: {', '.join(required + optional)})")
        for key in required:
            if key not in value:
                self.fail(path, f"missing key {key!r}")
        return value

    def string(self, value: Any, path: tuple, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {type(value).__name__} {value!r}")
        if not allow_empty and not value.strip():
            self.fail(path, "is empty")
        return value

    def items(self, value: Any, path: tuple) -> list:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {type(value).__name__}")
        if not value:
            self.fail(path, "is an empty list")
        return value


def parse_constitution(data: Any, file: str = "<constitution>", lines: dict[tuple, int] | None = None) -> Constitution:
    """Validate a loaded constitution (``data``) into a :class:`Constitution`; errors name ``file:line``."""
    c = _Checker(file, lines or {})
    top = c.mapping(data, (), ("principles",), ("name", "few_shot", "feedback", "chat"))
    principles, names = [], set()
    for i, raw in enumerate(c.items(top["principles"], ("principles",))):
        path = ("principles", i)
        raw = c.mapping(raw, path, ("name", "critique_request", "revision_request"), ("choice",))
        p = Principle(**{k: c.string(v, (*path, k)) for k, v in raw.items()})
        if p.name in names:
            c.fail((*path, "name"), f"a second principle named {p.name!r}")
        names.add(p.name)
        principles.append(p)
    few_shot = []
    for i, chat in enumerate(c.items(top["few_shot"], ("few_shot",)) if "few_shot" in top else []):
        messages = []
        for j, m in enumerate(c.items(chat, ("few_shot", i))):
            m = c.mapping(m, ("few_shot", i, j), ("role", "content"), ())
            if m["role"] not in ROLES:
                c.fail(("few_shot", i, j, "role"), f"unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
            messages.append({"role": m["role"], "content": c.string(m["content"], ("few_shot", i, j, "content"))})
        if messages[-1]["role"] != "assistant":
            c.fail(("few_shot", i), "a few-shot transcript must end with an assistant turn")
        few_shot.append(tuple(messages))
    feedback = FeedbackQuestion()
    if "feedback" in top:
        keys = ("mode", "principles", "template", "options", "answer_prefix", "no_problems")
        raw = c.mapping(top["feedback"], ("feedback",), (), keys)
        mode = raw.get("mode", "choice")
        if mode not in ("choice", "critique"):
            c.fail(("feedback", "mode"), f"expected choice or critique, got {mode!r}")
        judged_under = raw.get("principles", "one")
        if judged_under not in ("one", "all"):
            c.fail(("feedback", "principles"), f"expected one or all, got {judged_under!r}")
        no_problems = c.string(raw["no_problems"], ("feedback", "no_problems")) if raw.get("no_problems") else None
        if mode == "critique" and no_problems is None:
            c.fail(("feedback",), "mode critique needs no_problems (the critique that finds nothing)")
        if no_problems is not None and (
            no_problems.count("{sentence}") > 1 or not no_problems.replace("{sentence}", "").strip()
        ):
            c.fail(("feedback", "no_problems"), "may hold {sentence} once, beside the verdict that is scored")
        options = tuple(
            c.string(o, ("feedback", "options", i))
            for i, o in enumerate(c.items(raw.get("options", list(feedback.options)), ("feedback", "options")))
        )
        if len(options) < 2 or len(set(options)) != len(options):
            c.fail(("feedback", "options"), f"needs at least two distinct labels, got {list(options)}")
        template = c.string(raw.get("template", feedback.template), ("feedback", "template"))
        for key in ("{prompt}", "{options}", "{choice}"):
            if key not in template:
                c.fail(("feedback", "template"), f"must contain {key}")
        prefix = c.string(raw.get("answer_prefix", feedback.answer_prefix), ("feedback", "answer_prefix"), True)
        feedback = FeedbackQuestion(template, options, prefix, mode, no_problems, judged_under)
    chat = ChatFormat()
    if "chat" in top:
        raw = c.mapping(top["chat"], ("chat",), (), ("template", "system", "human", "assistant", "separator"))
        if raw.get("template", "auto") not in ("auto", True, False):
            c.fail(("chat", "template"), f"expected auto, true or false, got {raw['template']!r}")
        if raw.get("system") is not None:
            c.string(raw["system"], ("chat", "system"))
        for key in ("human", "assistant", "separator"):
            if key in raw:
                c.string(raw[key], ("chat", key), allow_empty=key == "separator")
        chat = ChatFormat(**raw)
    name = c.string(top.get("name", "constitution"), ("name",))
    return Constitution(tuple(principles), tuple(few_shot), feedback, chat, name)


def load_constitution(path: str | os.PathLike) -> Constitution:
    """Read and validate a constitution file (YAML or JSON)."""
    file = os.fspath(path)
    if not Path(file).is_file():
        raise FileNotFoundError(f"no constitution file {file!r}")
    try:
        node = yaml.compose(Path(file).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConstitutionError(f"{file}:{line}: not valid YAML or JSON: {getattr(err, 'problem', err)}") from None
    if node is None:
        raise ConstitutionError(f"{file}:1: the file is empty")
    lines: dict[tuple, int] = {}
    return parse_constitution(_plain(node, lines, ()), file, lines)
