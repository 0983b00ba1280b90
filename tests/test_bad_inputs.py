"""Bad inputs a user can act on: each error names the file, the line where there is one, and the problem."""

from __future__ import annotations

import json
import logging

import pytest

from rlhf_lightning.data.records import RecordError, load_examples
from rlhf_lightning.models import load_causal_lm, load_tokenizer
from rlhf_lightning.models.reward import load_reward_model


def write(path, lines: list[bytes | str]) -> str:
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return str(path)


GOOD = json.dumps({"prompt": "The movie was", "response": " fine."})


# ----------------------------------------------------------------------------- files
def test_non_utf8_line_names_file_line_and_byte(tmp_path):
    f = write(tmp_path / "d.jsonl", [GOOD, b'{"prompt": "caf\xe9", "response": " ok"}', GOOD])
    with pytest.raises(RecordError, match=r"d\.jsonl:2: line is not valid UTF-8 \(byte 0xe9 at column 16\)"):
        load_examples(f, "sft")


def test_non_utf8_line_is_skipped_and_counted_when_not_strict(tmp_path, caplog):
    f = write(tmp_path / "d.jsonl", [GOOD, b"\xff\xfe", GOOD])
    with caplog.at_level(logging.WARNING):
        assert len(load_examples(f, "sft", strict=False)) == 2
    assert "skipped 1 bad records" in caplog.text and "d.jsonl:2" in caplog.text


def test_non_utf8_in_a_json_file_names_the_line(tmp_path):
    f = write(tmp_path / "d.json", [GOOD, b'{"prompt": "\xc3", "response": " x"}'])
    with pytest.raises(RecordError, match=r"d\.json:2: line is not valid UTF-8"):
        load_examples(f, "sft")


def test_json_lines_under_another_extension_are_read_by_content(tmp_path):
    f = write(tmp_path / "data.txt", [GOOD, GOOD])
    assert len(load_examples(f, "sft")) == 2


def test_json_array_under_another_extension_is_read_by_content(tmp_path):
    f = tmp_path / "data.dat"
    f.write_text(json.dumps([json.loads(GOOD)] * 3))
    assert len(load_examples(str(f), "sft")) == 3


def test_unrecognisable_content_says_which_formats_are_read(tmp_path):
    f = write(tmp_path / "notes.txt", ["prompt,response", "a,b"])
    with pytest.raises(ValueError, match=r"notes\.txt: cannot tell the data format .* save it as \.jsonl"):
        load_examples(f, "sft")


def test_missing_jsonl_file_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: no such file"):
        load_examples(str(tmp_path / "missing.jsonl"), "sft")


# ----------------------------------------------------------------------------- records
def test_null_prompt_in_a_preference_record_is_a_null_prompt_error(tmp_path):
    f = write(tmp_path / "p.jsonl", [json.dumps({"prompt": None, "chosen": "a", "rejected": "b"})])
    with pytest.raises(RecordError, match=r"p\.jsonl:1: field 'prompt' is null"):
        load_examples(f, "preference")


def test_two_assistant_turns_in_a_row_are_an_error(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]
    chat += [{"role": "assistant", "content": "b"}]
    f = write(tmp_path / "c.jsonl", [json.dumps({"messages": chat})])
    with pytest.raises(RecordError, match=r"c\.jsonl:1: messages\[2\]: two assistant turns in a row"):
        load_examples(f, "sft")


# ----------------------------------------------------------------------------- exports
def test_missing_export_directory_says_which_stage_writes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"runs/x/sft/hf does not exist.*written by the 'sft' stage"):
        load_tokenizer("runs/x/sft/hf")


def test_empty_model_directory_says_it_is_empty(tmp_path, tokenizer):
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model directory .*hf is empty"):
        load_causal_lm(str(tmp_path / "hf"), tokenizer)


def test_directory_without_config_lists_what_it_holds(tmp_path):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "weights.bin").write_bytes(b"0")
    with pytest.raises(FileNotFoundError, match=r"reward model directory .*rm holds no config\.json.*weights\.bin"):
        load_reward_model(str(tmp_path / "rm"))


def test_a_file_given_as_model_directory(tmp_path, tokenizer):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"0")
    with pytest.raises(NotADirectoryError, match="is a file; give the export directory"):
        load_causal_lm(str(f), tokenizer)


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": -4}, "batch_size must be a positive integer, got -4"),
        ({"val_batch_size": 0}, "val_batch_size must be a positive integer"),
        ({"max_response_length": 0}, "max_response_length must be a positive integer"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
    ],
)
def test_data_sizes_are_checked_before_anything_is_built(tmp_path, kwargs, problem):
    from rlhf_lightning.data.datamodules import SFTDataModule

    f = write(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError, match=f"SFTDataModule: {problem}"):
        SFTDataModule(tokenizer="unused", train_file=f, **kwargs)  # fails before loading the tokenizer


@pytest.mark.parametrize("name", ["num_samples", "ppo_epochs", "minibatch_size", "micro_batch_size"])
def test_online_rl_sizes_are_checked_before_models_are_built(tokenizer_dir, name):
    from rlhf_lightning.systems.online_rl import OnlineRLModule

    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
        OnlineRLModule(model="unused", tokenizer=tokenizer_dir, reward_functions=["m:f"], **{name: 0})


def test_config_error_is_short_and_names_key_and_value(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "rlhf_lightning.cli", "fit", "-c", "configs/sft.yaml"]
    proc = subprocess.run([*cmd, "--data.init_args.batch_size=abc"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 15, proc.stderr
    assert 'Parser key "batch_size"' in proc.stderr and "Got value: abc" in proc.stderr


# ----------------------------------------------------------------------------- the record corpus
U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
RECORD_CASES = [
    # (kind, line 2 of the file, the problem the message must state)
    ("sft", '{"prompt": "a", "response": "b"', r"line is not valid JSON"),
    ("sft", "[1, 2]", r"expected a JSON object, got list"),
    ("sft", {"prompt": "a"}, r"missing key 'response' \(record has keys \['prompt'\]\)"),
    ("sft", {"prompt": "a", "response": None}, r"field 'response' is null"),
    ("sft", {"prompt": "a", "response": 3}, r"field 'response' must be a string, got int"),
    ("sft", {"prompt": "a", "response": ""}, r"field 'response' is empty"),
    ("sft", {"messages": "hi"}, r"field 'messages' must be a non-empty list of messages"),
    ("sft", {"messages": []}, r"field 'messages' must be a non-empty list of messages"),
    ("sft", {"messages": [U, "x"]}, r"messages\[1\] must be an object with 'role' and 'content'"),
    ("sft", {"messages": [{"role": "robot", "content": "x"}, A]}, r"messages\[0\]: unknown role 'robot'"),
    ("sft", {"messages": [U, {"role": "assistant"}]}, r"messages\[1\]: missing key 'content'"),
    ("sft", {"messages": [A, U]}, r"last message of 'messages' must be from the assistant, got 'user'"),
    ("sft", {"messages": [A]}, r"'messages' has no prompt"),
    ("preference", {"prompt": "p", "chosen": "a"}, r"missing key 'rejected'"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, r"chosen and rejected are identical"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"}, r"'margin' must be a finite"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, r"'margin' must be"),
    ("preference", {"chosen": "Human: a", "rejected": "Human: b"}, r"no shared prompt"),
    ("preference", {"chosen": [U, A], "rejected": [{"role": "user", "content": "other"}, A]}, r"no shared prompt"),
    ("prompt", {"text": "a"}, r"expected key 'prompt' or 'messages'"),
    ("prompt", {"messages": [U, A]}, r"last message of 'messages' must not be from the assistant in a prompt"),
    ("prompt", {"prompt": ""}, r"field 'prompt' is empty"),
]


@pytest.mark.parametrize("kind, bad, problem", RECORD_CASES)
def test_bad_record_names_file_line_and_problem(tmp_path, kind, bad, problem):
    good = {
        "sft": GOOD,
        "preference": json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
        "prompt": json.dumps({"prompt": "p"}),
    }[kind]
    f = write(tmp_path / "data.jsonl", [good, bad if isinstance(bad, str) else json.dumps(bad), good])
    with pytest.raises(RecordError, match=rf"data\.jsonl:2: .*{problem}"):
        load_examples(f, kind)
    assert len(load_examples(f, kind, strict=False)) == 2  # skipped and counted instead
