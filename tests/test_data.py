"""Tests of the data layer: record reading/validation, tokenisation, collation, DataModules."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from data_fixtures import data_tokenizer, data_tokenizer_dir, write_jsonl  # noqa: F401 (fixtures)

from rlhf_lightning.data.collate import (
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)
from rlhf_lightning.data.datamodules import (
    LengthGroupedSampler,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    TokenWindowSampler,
    split_examples,
)
from rlhf_lightning.data.records import (
    PreferenceExample,
    PromptExample,
    RecordError,
    SFTExample,
    load_examples,
    read_records,
)

SFT_RECORDS = [{"prompt": f"the cat sat {i}", "response": f"on the mat {i}"} for i in range(6)]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- records


def test_broken_third_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SFT_RECORDS[0], "", SFT_RECORDS[1], '{"prompt": "x", '])
    with pytest.raises(RecordError, match=rf"^{path}:4: line is not valid JSON"):
        list(read_records(path))  # the blank line 2 is skipped but still counted
    path = write_jsonl(tmp_path / "e.jsonl", [SFT_RECORDS[0], SFT_RECORDS[1], "not json"])
    with pytest.raises(RecordError) as err:
        load_examples(path, "sft")
    assert str(err.value).startswith(f"{path}:3: ")
    write_jsonl(path, [SFT_RECORDS[0], "[1, 2]"])
    with pytest.raises(RecordError, match=rf"{path}:2: expected a JSON object, got list"):
        load_examples(path, "sft")


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": "hi"}, "missing key 'response'"),
        ({"prompt": "hi", "response": ""}, "field 'response' is empty"),
        ({"prompt": "  ", "response": "ok"}, "field 'prompt' is empty"),
        ({"prompt": "hi", "response": 3}, "field 'response' must be a string, got int"),
        ({"prompt": "hi", "response": None}, "field 'response' is null"),
        ({"text": "hi"}, "expected keys 'prompt' and 'response', or 'messages'"),
        (
            {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "messages[0]: unknown role 'human'",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message of 'messages' must be from the assistant"),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]},
            "messages[0]: missing key 'content'",
        ),
        ({"messages": "hi"}, "field 'messages' must be a non-empty list of messages, got str"),
    ],
)
def test_bad_sft_records_name_file_line_and_problem(tmp_path, data_tokenizer, record, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [SFT_RECORDS[0], record])
    with pytest.raises(RecordError) as err:
        load_examples(path, "sft", data_tokenizer)
    assert str(err.value).startswith(f"{path}:2: ") and problem in str(err.value)


def test_non_strict_skips_and_counts(tmp_path, caplog):
    records = [SFT_RECORDS[0], {"prompt": "x"}, "{oops", SFT_RECORDS[1], {"prompt": "x", "response": None}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with caplog.at_level(logging.WARNING):
        examples = load_examples(path, "sft", strict=False)
    assert examples == [SFTExample(**SFT_RECORDS[0]), SFTExample(**SFT_RECORDS[1])]
    assert f"skipped 3 bad records in {path} (first: {path}:2: missing key 'response'" in caplog.text


def test_json_parquet_and_datasets_read_like_jsonl(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = load_examples(write_jsonl(tmp_path / "d.jsonl", SFT_RECORDS), "sft")
    assert [e.response for e in expected] == [f"on the mat {i}" for i in range(6)]
    (tmp_path / "a.json").write_text(json.dumps(SFT_RECORDS))
    write_jsonl(tmp_path / "l.json", SFT_RECORDS)  # JSON Lines under a .json name
    pq.write_table(pa.Table.from_pylist(SFT_RECORDS), tmp_path / "d.parquet")
    datasets.Dataset.from_list(SFT_RECORDS).save_to_disk(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SFT_RECORDS)}).save_to_disk(tmp_path / "dd")
    for source in ("a.json", "l.json", "d.parquet", "ds", "dd"):
        assert load_examples(tmp_path / source, "sft") == expected, source
    # row-indexed sources say "record N" (0-based)
    bad = SFT_RECORDS[:1] + [{"prompt": "p", "response": ""}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=rf"^{tmp_path}/bad.parquet:record 1: field 'response' is empty"):
        load_examples(tmp_path / "bad.parquet", "sft")


def test_chat_messages_use_chat_template(tmp_path, data_tokenizer):
    msgs = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "tell me a joke"},
        {"role": "assistant", "content": "why did the cat sit?"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (sft,) = load_examples(path, "sft", data_tokenizer)
    # the template writes "<role>: <content>\n" per turn, then "assistant:"; the space it writes
    # between "assistant:" and the reply belongs to the response (prompt + response = the rendering)
    assert sft == SFTExample("system: be kind\nuser: tell me a joke\nassistant:", " why did the cat sit?")
    (prompt,) = load_examples(write_jsonl(path, [{"messages": msgs[:2]}]), "prompt", data_tokenizer)
    assert prompt == PromptExample("system: be kind\nuser: tell me a joke\nassistant:")
    with pytest.raises(RecordError, match="must not be from the assistant"):
        load_examples(write_jsonl(path, [{"messages": msgs}]), "prompt", data_tokenizer)


H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.mark.parametrize(
    "chosen, rejected, prompt, chosen_resp, rejected_resp",
    [
        (
            f"{H} How are you?{A} I am fine.",
            f"{H} How are you?{A} I hate you.",
            f"{H} How are you?{A}",
            "I am fine.",
            "I hate you.",
        ),
        (
            f"{H} hi{A} hello{H} a joke?{A} a cat sat.",
            f"{H} hi{A} hello{H} a joke?{A} no.",
            f"{H} hi{A} hello{H} a joke?{A}",
            "a cat sat.",
            "no.",
        ),
        # diverging in the first reply: later turns belong to the responses
        (
            f"{H} help?{A} yes{H} thanks{A} welcome",
            f"{H} help?{A} no{H} why?{A} because",
            f"{H} help?{A}",
            f"yes{H} thanks{A} welcome",
            f"no{H} why?{A} because",
        ),
    ],
)
def test_hh_transcripts_split_at_last_shared_assistant_turn(
    tmp_path, chosen, rejected, prompt, chosen_resp, rejected_resp
):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    assert load_examples(path, "preference") == [PreferenceExample(prompt, chosen_resp, rejected_resp, None)]


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"chosen": f"{H} hi{A} yo", "rejected": f"{H} bye{A} yo"}, "no shared prompt"),
        ({"chosen": f"{H} hi{A} yo", "rejected": f"{H} hi{A} yo"}, "chosen and rejected are identical"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen and rejected are identical"),
        ({"prompt": "p", "chosen": "a"}, "missing key 'rejected'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "c"}],
            },
            "no shared prompt",
        ),
    ],
)
def test_bad_preference_records(tmp_path, data_tokenizer, record, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(RecordError, match=rf"^{path}:2: .*{problem}"):
        load_examples(path, "preference", data_tokenizer)


def test_conversational_preferences(tmp_path, data_tokenizer):
    user = [{"role": "user", "content": "hi"}]
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    records = [
        {"prompt": user, "chosen": reply("hello"), "rejected": reply("go"), "margin": 2},
        {"chosen": user + reply("hello"), "rejected": user + reply("go")},
    ]
    examples = load_examples(write_jsonl(tmp_path / "c.jsonl", records), "preference", data_tokenizer)
    assert examples == [
        PreferenceExample("user: hi\nassistant:", " hello", " go", 2.0),
        PreferenceExample("user: hi\nassistant:", " hello", " go", None),
    ]


# ----------------------------------------------------------------------------- tokenisation


def test_sft_label_masking_by_hand(data_tokenizer):
    tok = data_tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert (pad, bos, eos) == (0, 1, 2)
    p, r = ids(tok, "the cat"), ids(tok, " sat on the mat")
    out = tokenize_sft(SFTExample("the cat", " sat on the mat"), tok, 16, 16)
    assert out["input_ids"] == [1, *p, *r, 2]
    assert out["labels"] == [-100] * (1 + len(p)) + [*r, 2]
    assert not out["prompt_truncated"] and not out["response_truncated"]

    short = tokenize_sft(SFTExample("hi", "ok"), tok, 16, 16)
    batch = SFTCollator(pad)([out, short])
    n_short = len(short["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(out["input_ids"]))
    assert batch["input_ids"][1].tolist() == short["input_ids"] + [0] * (len(out["input_ids"]) - n_short)
    assert batch["labels"][1, n_short:].eq(-100).all() and batch["labels"][1, n_short - 1] == eos
    assert batch["attention_mask"].sum(1).tolist() == [len(out["input_ids"]), n_short]


def test_truncation_prompt_left_response_right(data_tokenizer):
    tok = data_tokenizer
    prompt, response = "the movie was great and the actors were wonderful", "i loved every minute of this"
    p, r = ids(tok, prompt), ids(tok, response)
    assert len(p) > 4 and len(r) > 3
    out = tokenize_sft(SFTExample(prompt, response), tok, max_prompt_length=4, max_response_length=3)
    # BOS kept, then the LAST 3 prompt tokens; the FIRST 3 response tokens, EOS cut off
    assert out["input_ids"] == [1, *p[-3:], *r[:3]]
    assert out["labels"] == [-100] * 4 + r[:3]
    assert out["prompt_truncated"] and out["response_truncated"]
    # exactly at the limit: the EOS fits, nothing is truncated
    fit = tokenize_sft(SFTExample(prompt, response), tok, len(p) + 1, len(r) + 1)
    assert fit["input_ids"][-1] == 2 and not fit["prompt_truncated"] and not fit["response_truncated"]
    q = tokenize_prompt(PromptExample(prompt), tok, 4)
    assert q == {"input_ids": [1, *p[-3:]], "prompt": prompt, "prompt_truncated": True}
    assert tokenize_prompt(PromptExample(prompt), tok, 1)["input_ids"] == p[-1:]  # no room for BOS
    # a template that already writes BOS does not get a second one
    assert tokenize_prompt(PromptExample("<s>the cat"), tok, 8)["input_ids"] == [1, *ids(tok, "the cat")]


def test_preference_collation_rows_and_shapes(data_tokenizer):
    tok = data_tokenizer
    pairs = [
        PreferenceExample("the cat", " sat on the mat", " ran", 1.5),
        PreferenceExample("how are you", " i am fine thank you today", " bad", None),
        PreferenceExample("hi", " ok", " what a wonderful performance by the whole cast", None),
    ]
    feats = [tokenize_preference(ex, tok, 32, 32) for ex in pairs]
    assert feats[0]["chosen_input_ids"] == [1, *ids(tok, "the cat"), *ids(tok, " sat on the mat"), 2]
    assert feats[0]["rejected_labels"][-1] == 2 and feats[0]["margin"] == 1.5
    batch = PreferenceCollator(tok.pad_token_id)(feats)
    seqs = [f["chosen_input_ids"] for f in feats] + [f["rejected_input_ids"] for f in feats]
    width = max(map(len, seqs))
    assert batch["num_pairs"] == 3 and width == len(feats[2]["rejected_input_ids"])
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (6, width)
    for row, seq in enumerate(seqs):  # rows 0..2 chosen, 3..5 rejected, right-padded
        assert batch["input_ids"][row].tolist() == seq + [0] * (width - len(seq))
    assert batch["margin"].tolist() == [1.5, 0.0, 0.0]
    assert "margin" not in PreferenceCollator(0)(feats[1:])


def test_prompt_collation_is_left_padded(data_tokenizer):
    tok = data_tokenizer
    feats = [tokenize_prompt(PromptExample(t), tok, 32) for t in ("the cat sat on the mat", "hi")]
    batch = PromptCollator(tok.pad_token_id)(feats)
    long, short = feats[0]["input_ids"], feats[1]["input_ids"]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, len(long))
    assert batch["input_ids"][1].tolist() == [0] * (len(long) - len(short)) + short
    assert batch["attention_mask"][1].tolist() == [0] * (len(long) - len(short)) + [1] * len(short)
    assert batch["attention_mask"][:, -1].eq(1).all() and batch["prompts"] == ["the cat sat on the mat", "hi"]


def test_seeded_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = split_examples(items, 0.1, seed=0)
    assert (train, val) == split_examples(items, 0.1, seed=0)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == items
    assert val != split_examples(items, 0.1, seed=1)[1]
    assert split_examples(items, 0.0, seed=0) == (items, [])
    assert len(split_examples(items[:3], 0.01, seed=0)[1]) == 1  # at least one held out


# ----------------------------------------------------------------------------- DataModules


def test_sft_datamodule_setup_and_batch(tmp_path, data_tokenizer_dir, caplog):
    records = SFT_RECORDS + [{"prompt": "the movie was great and the actors were wonderful " * 3, "response": "ok"}]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    dm = SFTDataModule(str(data_tokenizer_dir), str(path), val_fraction=0.3, max_prompt_length=12, batch_size=4)
    assert dm.tokenizer.pad_token_id == 0  # loaded eagerly, before setup
    dm.setup("fit")
    train, val = dm.train_dataset, dm.val_dataset
    dm.setup("validate")  # idempotent
    assert dm.train_dataset is train and (len(train), len(val)) == (5, 2)
    # one record (train or val, by the seeded split) has a prompt longer than 12 tokens
    counts = [dm.truncation[split]["prompts_truncated"] for split in ("train", "val")]
    assert len(counts) == 2 and sum(counts) == 1 == sum(f["prompt_truncated"] for f in train + val)
    batch = next(iter(dm.train_dataloader()))
    assert (
        set(batch) == {"input_ids", "attention_mask", "labels", "loss_denominator"} and batch["input_ids"].shape[0] == 4
    )
    # No accumulation, one process: the denominator is this batch's scored tokens (a token mean).
    assert batch["loss_denominator"].item() == (batch["labels"][:, 1:] != -100).sum().item()
    assert "loss_denominator" not in next(iter(dm.val_dataloader()))
    assert (batch["labels"] != -100).sum() > 0 and batch["input_ids"].shape == batch["labels"].shape
    first = [next(iter(dm.train_dataloader()))["input_ids"] for _ in range(2)]
    assert torch.equal(*first)  # seeded shuffle
    assert len(list(dm.val_dataloader())) == 1
    assert SFTDataModule(str(data_tokenizer_dir), str(path), val_fraction=0).setup() is None


def test_preference_datamodule_setup_and_batch(tmp_path, data_tokenizer_dir):
    records = [{"prompt": f"the cat {i}", "chosen": "sat on the mat", "rejected": "ran", "margin": i} for i in range(5)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", records[:2])
    dm = PreferenceDataModule(str(data_tokenizer_dir), str(train), val_file=str(val), batch_size=3, val_batch_size=2)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (5, 2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_pairs"] == 3 and batch["input_ids"].shape[0] == 6 and batch["margin"].shape == (3,)
    n_chosen, n_rejected = len(ids(dm.tokenizer, "sat on the mat")) + 1, len(ids(dm.tokenizer, "ran")) + 1  # + EOS
    assert n_chosen != n_rejected
    assert batch["labels"][:3].ne(-100).sum(1).tolist() == [n_chosen] * 3  # rows 0..B-1 chosen
    assert batch["labels"][3:].ne(-100).sum(1).tolist() == [n_rejected] * 3
    assert next(iter(dm.val_dataloader()))["num_pairs"] == 2


def test_prompt_datamodule_eval_and_predict(tmp_path, data_tokenizer_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"the cat sat {i}"} for i in range(6)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "hi"}, {"prompt": "how are you today"}, {"prompt": "x"}])
    dm = PromptDataModule(str(data_tokenizer_dir), str(train), eval_file=str(held), val_fraction=0, batch_size=4)
    assert dm.hparams.max_response_length == 64 and dm.tokenizer.padding_side == "left"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "prompts"} and batch["input_ids"].shape[0] == 4
    (val_batch,) = list(dm.val_dataloader())  # eval_file serves as validation
    assert val_batch["prompts"] == ["hi", "how are you today", "x"]
    assert val_batch["input_ids"][0, 0] == 0 and val_batch["attention_mask"][:, -1].eq(1).all()
    assert next(iter(dm.predict_dataloader()))["prompts"] == ["hi", "how are you today", "x"]
    no_eval = PromptDataModule(str(data_tokenizer_dir), str(train), val_fraction=0, batch_size=4)
    no_eval.setup()
    assert no_eval.eval_dataloader() is None and no_eval.val_dataloader() == []
    assert sum(len(b["prompts"]) for b in no_eval.predict_dataloader()) == 6


def _padded_tokens(lengths: list[int], order: list[int], batch: int) -> int:
    return sum(batch * max(lengths[i] for i in order[k : k + batch]) for k in range(0, len(order), batch))


def test_length_grouped_sampler_is_a_shuffled_permutation_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (400,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, chunk=8, generator=torch.Generator().manual_seed(1))
    epochs = [list(sampler) for _ in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(400)) and len(sampler) == 400
        assert max(lengths[i] for i in order[:8]) == max(lengths)  # the longest batch comes first
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    again = LengthGroupedSampler(lengths, chunk=8, generator=torch.Generator().manual_seed(1))
    assert list(again) == epochs[0]  # same seed, same order (every DDP rank agrees)
    random_order = torch.randperm(400, generator=g).tolist()
    assert _padded_tokens(lengths, epochs[0], 8) < 0.8 * _padded_tokens(lengths, random_order, 8)
    # Batch lengths do not cycle from long to short inside each mega-batch (they are shuffled).
    maxima = [max(lengths[i] for i in epochs[0][k : k + 8]) for k in range(8, 400, 8)]
    assert maxima != sorted(maxima, reverse=True)


def test_length_grouped_sampler_deals_whole_chunks_to_ddp_ranks():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    lengths = torch.randint(5, 200, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    batch, world = 4, 2

    def sampler():
        return LengthGroupedSampler(lengths, chunk=batch * world, generator=torch.Generator().manual_seed(3))

    order = list(sampler())
    chunk_of = {idx: pos // (batch * world) for pos, idx in enumerate(order)}
    for rank in range(world):
        # What Lightning does to a custom sampler under DDP (no shuffling of its own).
        mine = list(DistributedSamplerWrapper(sampler(), num_replicas=world, rank=rank, shuffle=False))
        for k in range(0, len(mine), batch):
            assert len({chunk_of[i] for i in mine[k : k + batch]}) == 1  # a rank's batch lies in one chunk


def test_datamodule_group_by_length_covers_every_example_with_less_padding(tmp_path, data_tokenizer_dir):
    words = "the movie was good and the actors were wonderful".split()
    records = [{"prompt": "review:", "response": " ".join(words[: 1 + i % 9])} for i in range(64)]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    seen, padding = {}, {}
    for grouped in (False, True):
        dm = SFTDataModule(str(data_tokenizer_dir), str(path), val_fraction=0, batch_size=4, group_by_length=grouped)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        seen[grouped] = sorted(
            tuple(row[m.bool()].tolist())
            for b in batches
            for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)
        )
        padding[grouped] = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert seen[True] == seen[False]  # the same examples, each once
    assert padding[True] < padding[False] / 2


@pytest.mark.parametrize("world,accumulate,batch,n", [(1, 3, 2, 13), (2, 3, 2, 29), (3, 2, 1, 10), (2, 1, 4, 8)])
def test_token_windows_make_ddp_accumulation_a_token_mean(world, accumulate, batch, n):
    # Each example i has a summed loss s_i over c_i tokens. Whatever the split into ranks and
    # micro-batches, (1/world) sum_ranks (1/accumulate) sum_micro (sum_{i in micro} s_i) / denominator
    # must equal the token mean sum s_i / sum c_i over the examples of each optimizer step.
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    g = torch.Generator().manual_seed(n)
    counts = torch.randint(1, 30, (n,), generator=g).tolist()
    sums = (torch.rand(n, generator=g) * torch.tensor(counts)).tolist()

    def sampler():
        base = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
        return TokenWindowSampler(base, counts, batch, accumulate, world)

    order = [i for i, _ in sampler()]
    assert len(order) % world == 0 and sorted(set(order)) == list(range(n))
    per_rank = [
        list(DistributedSamplerWrapper(sampler(), num_replicas=world, rank=r, shuffle=False)) for r in range(world)
    ]
    assert sum(len(p) for p in per_rank) == len(order)  # the wrapper pads nothing more
    micro = [[p[k : k + batch] for k in range(0, len(p), batch)] for p in per_rank]
    window = batch * world * accumulate
    steps = -(-len(order) // window)
    for step in range(steps):
        grad = 0.0
        for r in range(world):
            for mb in micro[r][step * accumulate : (step + 1) * accumulate]:
                assert len({d for _, d in mb}) == 1  # one denominator per micro-batch
                grad += sum(sums[i] for i, _ in mb) / mb[0][1] / accumulate / world
        members = order[step * window : (step + 1) * window]
        assert grad == pytest.approx(sum(sums[i] for i in members) / sum(counts[i] for i in members), rel=1e-9)
