"""Constitution files: the shipped ones load; every problem names the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_lightning.cai import ConstitutionError, load_constitution

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name: tiny
principles:
  - name: rude
    critique_request: Is it rude?
    revision_request: Make it polite.
    choice: Which is more polite?
  - name: vague
    critique_request: Is it vague?
    revision_request: Make it precise.
"""


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_constitutions_load():
    demo = load_constitution(ROOT / "configs/constitution_demo.yaml")
    assert [p.name for p in demo.principles] == ["negativity", "harshness", "enthusiasm", "defects"]
    assert all(p.choice for p in demo.principles) and demo.feedback.options == ("(A)", "(B)")
    assert demo.feedback.mode == "critique" and demo.feedback.no_problems == "{sentence} (ok)"
    assert demo.feedback.principles == "all"
    chat = load_constitution(ROOT / "configs/constitution_chat_example.yaml")
    assert chat.chat.system and len(chat.few_shot) == 1 and chat.few_shot[0][-1]["role"] == "assistant"


def test_parses_defaults_and_choice_principles(tmp_path):
    c = load_constitution(_write(tmp_path, GOOD))
    assert c.name == "tiny" and len(c.principles) == 2
    assert [p.name for p in c.choice_principles] == ["rude"]
    assert c.principles[1].choice is None
    assert c.feedback.template == "{prompt}\n{options}\n{choice}" and c.chat.template == "auto"


def test_json_is_accepted(tmp_path):
    text = '{"principles": [{"name": "a", "critique_request": "c?", "revision_request": "r."}]}'
    assert load_constitution(_write(tmp_path, text, "c.json")).principles[0].name == "a"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # a missing field: the principle's line
        (
            GOOD.replace("    revision_request: Make it polite.\n", ""),
            ":3: principles.0: missing key 'revision_request'",
        ),
        # an unknown key: its own line
        (GOOD + "    critque: typo\n", ":10: principles.1.critque: unknown key 'critque'"),
        # an empty list
        ("principles: []\n", ":1: principles: is an empty list"),
        # an empty string
        (GOOD.replace("Is it vague?", "''"), ":8: principles.1.critique_request: is empty"),
        # a duplicate name
        (GOOD.replace("name: vague", "name: rude"), ":7: principles.1.name: a second principle named 'rude'"),
        # a wrong type
        (GOOD.replace("Make it precise.", "[1, 2]"), ":9: principles.1.revision_request: expected a string"),
        # an unknown top-level key
        (GOOD + "principals: []\n", ":10: principals: unknown key 'principals'"),
        # feedback: one option only; a template without {options}
        (GOOD + "feedback:\n  options: ['(A)']\n", ":11: feedback.options: needs at least two distinct labels"),
        (GOOD + "feedback:\n  template: '{prompt} {choice}'\n", ":11: feedback.template: must contain {options}"),
        # feedback: an unknown mode; critique mode without the no-problems critique
        (GOOD + "feedback:\n  mode: vote\n", ":11: feedback.mode: expected choice or critique"),
        (GOOD + "feedback:\n  mode: critique\n", ":10: feedback: mode critique needs no_problems"),
        (GOOD + "feedback:\n  principles: some\n", ":11: feedback.principles: expected one or all, got 'some'"),
        (
            GOOD + "feedback:\n  mode: critique\n  no_problems: '{sentence} {sentence}'\n",
            ":12: feedback.no_problems: may hold {sentence} once",
        ),
        (GOOD + "feedback:\n  mode: critique\n  no_problems: '{sentence} '\n", ":12: feedback.no_problems: may hold"),
        # chat: a bad template switch
        (GOOD + "chat:\n  template: maybe\n", ":11: chat.template: expected auto, true or false"),
        # few-shot: an unknown role; a transcript that does not end with the assistant
        (GOOD + "few_shot:\n  - [{role: bot, content: hi}]\n", ":11: few_shot.0.0.role: unknown role 'bot'"),
        (GOOD + "few_shot:\n  - [{role: user, content: hi}]\n", ":11: few_shot.0: a few-shot transcript must end"),
        # not a mapping at all
        ("- a\n- b\n", ":1: (top level): expected a mapping"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, text, where):
    path = _write(tmp_path, text)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    assert str(err.value).startswith(str(path) + where), str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no constitution file"):
        load_constitution(tmp_path / "missing.yaml")
    with pytest.raises(ConstitutionError, match=r"c.yaml:1: the file is empty"):
        load_constitution(_write(tmp_path, ""))
    with pytest.raises(ConstitutionError, match=r"c.yaml:3: not valid YAML or JSON"):
        load_constitution(_write(tmp_path, "principles:\n  - [unclosed\n"))
