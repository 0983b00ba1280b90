"""Reading records (JSONL, JSON, Parquet, ``datasets``) and validating them into typed examples.

Three kinds of example feed the stages: :class:`SFTExample` (SFT), :class:`PreferenceExample`
(reward model, DPO) and :class:`PromptExample` (PPO rollouts, generation). Each accepted
record format is parsed by one function that either returns the example or raises a
:class:`RecordError` naming the file, the line (or record index) and the problem, so that a
bad record never passes silently. :func:`load_examples` ties reading and parsing together
and can skip (and count) bad records instead of failing.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_lightning.data.reading import JSONL_SUFFIXES, Location, RecordError, iter_records, read_records

log = logging.getLogger(__name__)

# Reading lives in data/reading.py; these names stay importable from here.
__all__ = [
    "JSONL_SUFFIXES",
    "Location",
    "PreferenceExample",
    "PromptExample",
    "RecordError",
    "SFTExample",
    "load_examples",
    "parse_preference",
    "parse_prompt",
    "parse_sft",
    "read_records",
    "split_hh_transcript",
]

ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class SFTExample:
    """A prompt and the response the model should learn to produce after it."""

    prompt: str
    response: str


@dataclass
class PreferenceExample:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response;
    ``margin`` is an optional preference strength for margin-aware pairwise losses and
    ``probability`` an optional soft label, P(chosen is better) in [0, 1] (AI feedback)."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    probability: float | None = None


@dataclass
class PromptExample:
    """A prompt to generate from (PPO rollouts, evaluation, prediction)."""

    prompt: str


# ----------------------------------------------------------------------------- validation


def _string(record: dict, key: str, loc: Location) -> str:
    """``record[key]`` as a non-empty string, or a RecordError saying what is wrong."""
    if key not in record:
        raise RecordError(loc, f"missing key {key!r} (record has keys {sorted(record)})")
    value = record[key]
    if value is None:
        raise RecordError(loc, f"field {key!r} is null")
    if not isinstance(value, str):
        raise RecordError(loc, f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(loc, f"field {key!r} is empty")
    return value


def _messages(value: Any, key: str, loc: Location) -> list[dict]:
    """Validate a chat as a non-empty list of ``{"role", "content"}`` with known roles."""
    if not isinstance(value, list) or not value:
        raise RecordError(loc, f"field {key!r} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(loc, f"{where} must be an object with 'role' and 'content', got {type(msg).__name__}")
        try:
            role, content = _string(msg, "role", loc), _string(msg, "content", loc)
        except RecordError as err:
            raise RecordError(loc, f"{where}: {err.problem}") from None
        if role not in ROLES:
            raise RecordError(loc, f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "assistant" and out and out[-1]["role"] == "assistant":
            raise RecordError(loc, f"{where}: two assistant turns in a row ({key}[{i - 1}] and {key}[{i}])")
        out.append({"role": role, "content": content})
    return out


def _render(messages: list[dict], tokenizer: Any, loc: Location, add_generation_prompt: bool) -> str:
    """``messages`` rendered as text by the tokenizer's chat template."""
    from jinja2.exceptions import TemplateError

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        # A configuration problem, not a bad record: never skipped by strict=False.
        raise ValueError(f"{loc}: chat-format records need a tokenizer with a chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:  # e.g. "System role not supported", roles that do not alternate
        roles = ", ".join(m["role"] for m in messages)
        raise RecordError(loc, f"the tokenizer's chat template rejects these messages ({roles}): {err}") from None


def _chat_prompt(messages: list[dict], tokenizer: Any, loc: Location) -> str:
    """Render prompt messages with the tokenizer's chat template, opening the assistant turn."""
    return _render(messages, tokenizer, loc, add_generation_prompt=True)


def _chat_example(prompt_messages: list[dict], reply: str, tokenizer: Any, loc: Location) -> tuple[str, str]:
    """``(prompt, response)`` texts of a chat whose last turn, ``reply``, is the assistant's.

    The prompt is rendered with the assistant turn opened (as for generation). Whatever the
    template writes between that opening and the reply's text (a space, a newline) belongs
    to the response, so that prompt + response is exactly the template's rendering of the
    conversation up to the end of the reply and the model learns what it will be asked to
    continue. What the template writes after the reply (end-of-turn markers) is left out:
    the data layer appends EOS. A template whose full rendering does not extend the prompt
    rendering gets the reply's text as it is.
    """
    prompt = _chat_prompt(prompt_messages, tokenizer, loc)
    full = _render([*prompt_messages, {"role": "assistant", "content": reply}], tokenizer, loc, False)
    at = full.find(reply, len(prompt)) if full.startswith(prompt) else -1
    return prompt, full[len(prompt) : at + len(reply)] if at >= 0 else reply


def _split_reply(messages: list[dict], key: str, loc: Location) -> tuple[list[dict], str]:
    """Split a chat into (prompt messages, final assistant reply)."""
    if messages[-1]["role"] != "assistant":
        raise RecordError(loc, f"last message of {key!r} must be from the assistant, got {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise RecordError(loc, f"{key!r} has no prompt: it needs at least one message before the assistant's reply")
    return messages[:-1], messages[-1]["content"]


def parse_sft(record: dict, location: Location, tokenizer: Any = None) -> SFTExample:
    """Parse ``{"prompt", "response"}`` or ``{"messages": [...]}`` (last message from the
    assistant; the others rendered with the tokenizer's chat template) into an SFTExample."""
    if "messages" in record:
        prompt_msgs, response = _split_reply(_messages(record["messages"], "messages", location), "messages", location)
        return SFTExample(*_chat_example(prompt_msgs, response, tokenizer, location))
    if "prompt" not in record:
        raise RecordError(location, f"expected keys 'prompt' and 'response', or 'messages'; got {sorted(record)}")
    return SFTExample(_string(record, "prompt", location), _string(record, "response", location))


def _margin(record: dict, loc: Location) -> float | None:
    value = record.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(loc, f"field 'margin' must be a finite number, got {value!r}")
    return float(value)


def _probability(record: dict, loc: Location) -> float | None:
    value = record.get("probability")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise RecordError(loc, f"field 'probability' must be a number in [0, 1], got {value!r}")
    return float(value)


def split_hh_transcript(chosen: str, rejected: str, location: Location) -> tuple[str, str, str]:
    """Split two Anthropic-HH transcripts into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix of both transcripts that ends with (and
    includes) a ``"\\n\\nAssistant:"`` marker; the responses are the remainders with the
    leading spaces stripped.
    """
    if chosen == rejected:
        raise RecordError(location, "chosen and rejected are identical")
    common = os.path.commonprefix([chosen, rejected])
    end = common.rfind(HH_ASSISTANT)
    if end < 0:
        raise RecordError(location, f"no shared prompt: chosen and rejected share no {HH_ASSISTANT!r} turn")
    prompt = chosen[: end + len(HH_ASSISTANT)]
    chosen_resp, rejected_resp = chosen[len(prompt) :].lstrip(" "), rejected[len(prompt) :].lstrip(" ")
    for name, text in (("chosen", chosen_resp), ("rejected", rejected_resp)):
        if not text.strip():
            raise RecordError(location, f"{name} response after the last shared {HH_ASSISTANT!r} is empty")
    return prompt, chosen_resp, rejected_resp


def parse_preference(record: dict, location: Location, tokenizer: Any = None) -> PreferenceExample:
    """Parse a preference pair into a PreferenceExample.

    Accepted: ``{"prompt", "chosen", "rejected"[, "margin"][, "probability"]}`` with strings;
    conversational ``{"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}`` or
    ``{"chosen": [msgs], "rejected": [msgs]}`` whose chats share every message but the
    final assistant reply (prompt rendered with the chat template); and Anthropic-HH
    transcripts ``{"chosen": str, "rejected": str}`` (see :func:`split_hh_transcript`).
    """
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError(location, f"missing key {key!r} (record has keys {sorted(record)})")
    margin, prob = _margin(record, location), _probability(record, location)
    prompt = record.get("prompt")
    if isinstance(record["chosen"], list) or isinstance(record["rejected"], list) or isinstance(prompt, list):
        lead = _messages(prompt, "prompt", location) if prompt is not None else []
        chats = [lead + _messages(record[k], k, location) for k in ("chosen", "rejected")]
        c_prompt, chosen = _split_reply(chats[0], "chosen", location)
        r_prompt, rejected = _split_reply(chats[1], "rejected", location)
        if c_prompt != r_prompt:
            raise RecordError(location, "no shared prompt: chosen and rejected must share every message but the last")
        if chosen == rejected:
            raise RecordError(location, "chosen and rejected are identical")
        rendered, chosen = _chat_example(c_prompt, chosen, tokenizer, location)
        _, rejected = _chat_example(c_prompt, rejected, tokenizer, location)
        return PreferenceExample(rendered, chosen, rejected, margin, prob)
    chosen, rejected = _string(record, "chosen", location), _string(record, "rejected", location)
    if "prompt" in record and prompt is None:
        raise RecordError(location, "field 'prompt' is null (leave the key out for Anthropic-HH transcripts)")
    if prompt is None:
        return PreferenceExample(*split_hh_transcript(chosen, rejected, location), margin, prob)
    prompt = _string(record, "prompt", location)
    if chosen == rejected:
        raise RecordError(location, "chosen and rejected are identical")
    return PreferenceExample(prompt, chosen, rejected, margin, prob)


def parse_prompt(record: dict, location: Location, tokenizer: Any = None) -> PromptExample:
    """Parse ``{"prompt": str}``, or ``{"messages": [...]}`` / ``{"prompt": [...]}`` (a chat
    that does not end with an assistant reply; rendered with the chat template)."""
    key = "messages" if "messages" in record else "prompt"
    if key not in record:
        raise RecordError(location, f"expected key 'prompt' or 'messages'; got {sorted(record)}")
    if key == "messages" or isinstance(record[key], list):
        messages = _messages(record[key], key, location)
        if messages[-1]["role"] == "assistant":
            raise RecordError(location, f"last message of {key!r} must not be from the assistant in a prompt")
        return PromptExample(_chat_prompt(messages, tokenizer, location))
    return PromptExample(_string(record, "prompt", location))


PARSERS: dict[str, Callable[..., Any]] = {"sft": parse_sft, "preference": parse_preference, "prompt": parse_prompt}


def load_examples(
    source: str | os.PathLike,
    kind: str,
    tokenizer: Any = None,
    strict: bool = True,
    split: str = "train",
) -> list:
    """Read ``source`` and parse every record into examples of ``kind``.

    Args:
        source: see :func:`read_records`.
        kind: ``"sft"``, ``"preference"`` or ``"prompt"``.
        tokenizer: needed for chat-format records (its chat template renders prompts).
        strict: raise at the first bad record (default); when False, skip bad records and
            log ``"skipped N bad records in FILE (first: ...)"`` as a warning.
        split: see :func:`read_records`.

    Returns:
        The examples, in file order.
    """
    if kind not in PARSERS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(PARSERS)}")
    parse = PARSERS[kind]
    examples, skipped = [], []
    for loc, record in iter_records(source, split):
        try:
            if isinstance(record, RecordError):
                raise record
            examples.append(parse(record, loc, tokenizer))
        except RecordError as err:
            if strict:
                raise
            skipped.append(err)
    if skipped:
        log.warning("skipped %d bad records in %s (first: %s)", len(skipped), os.fspath(source), skipped[0])
    return examples
