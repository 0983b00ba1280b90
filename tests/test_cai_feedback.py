"""AI feedback: option probabilities by hand, both orders asked, position bias averaged out; soft
labels in records and batches; the soft-label Bradley–Terry loss by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhf_lightning.cai import ChatFormat, Constitution, FeedbackQuestion, Principle
from rlhf_lightning.cai.feedback import PairLabel, label_pairs, option_probabilities
from rlhf_lightning.cai.label import gold_agreement

V = 128  # the fake tokenizer's ids are the characters' code points


class CharTokenizer:
    """One token per ASCII character (id = code point); pad 0, EOS 1, no BOS."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, None
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 1)


class Bigram(nn.Module):
    """Logits of the next token = ``table[current token]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)  # (V, V)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


class Judge(nn.Module):
    """Prefers the option whose response is ``x`` (odds 3:1) and label ``A`` (odds 2:1), wherever
    they stand; records every sequence it reads."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def next_token_logits(self, text: str) -> torch.Tensor:
        """``(V,)``: the same logits at every position of a sequence reading ``text``."""
        logits = torch.zeros(V)
        x_first = text.find("A x") >= 0  # option A holds the response "x"
        logits[ord("A" if x_first else "B")] += math.log(3)
        logits[ord("A")] += math.log(2)
        return logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, V)  # (B, T, V)
        for b, row in enumerate(input_ids.tolist()):
            text = "".join(chr(i) for i in row if i > 1)
            self.seen.append(text)
            logits[b] = self.next_token_logits(text)
        return SimpleNamespace(logits=logits)


def test_option_probabilities_by_hand():
    table = torch.zeros(V, V)
    table[ord("p"), ord("A")] = math.log(3)  # after "p": A:B = 3:1
    table[ord("q"), ord("B")] = math.log(4)  # after "q": A:B = 1:4
    table[ord("("), ord("A")] = math.log(2)  # multi-token labels: "(" -> A:B = 2:1 ...
    table[ord("A"), ord(")")] = math.log(5)  # ... and ")" after A is 5x as likely as after B
    model, tok = Bigram(table), CharTokenizer()
    probs = option_probabilities(model, tok, ["xp", "q"], ["A", "B"])
    torch.testing.assert_close(probs, torch.tensor([[0.75, 0.25], [0.2, 0.8]]))
    # P("(A)") / P("(B)") = [P(A|"(") P(")"|A)] / [P(B|"(") P(")"|B)], P("(") shared:
    # P(A|"(") = 2/(V+1), P(B|"(") = 1/(V+1); P(")"|A) = 5/(V+4), P(")"|B) = 1/V.
    a, b = 2 / (V + 1) * 5 / (V + 4), 1 / (V + 1) * 1 / V
    probs = option_probabilities(model, tok, ["p", "zz"], ["(A)", "(B)"], batch_size=3)
    torch.testing.assert_close(probs, torch.tensor([[a / (a + b), b / (a + b)]] * 2))


def _const() -> tuple[Constitution, Principle]:
    p = Principle("good", "Bad?", "Fix.", "Which is better?")
    q = FeedbackQuestion("{prompt}\n{options}\n{choice}", ("A", "B"), "")
    return Constitution((p,), feedback=q, chat=ChatFormat(template=False, human="U:", assistant="S:")), p


def test_both_orders_are_asked_and_averaged():
    const, p = _const()
    judge = Judge()
    (label,) = label_pairs(judge, CharTokenizer(), ["q"], [("x", "y")], [p], const)
    # x first: A=x has 3*2, B=y has 1 -> 6/7; y first: A=y has 2, B=x has 3 -> P(B) = 3/5.
    assert label.p_xy == pytest.approx(6 / 7) and label.p_yx == pytest.approx(3 / 5)
    assert label.probability == pytest.approx((6 / 7 + 3 / 5) / 2) and not label.orders_disagree
    prompts = {s.rsplit("S:", 1)[0] for s in judge.seen}
    assert prompts == {"U: q\nA x\nB y\nWhich is better?\n\n", "U: q\nA y\nB x\nWhich is better?\n\n"}


def test_pure_position_bias_averages_to_one_half():
    const, p = _const()
    table = torch.zeros(V, V)
    table[ord(":"), ord("A")] = math.log(3)  # always "A" (the prompt ends with "S:"), 3:1
    (label,) = label_pairs(Bigram(table), CharTokenizer(), ["q"], [("x", "y")], [p], const)
    assert (label.p_xy, label.p_yx) == pytest.approx((0.75, 0.25))
    assert label.probability == pytest.approx(0.5) and label.orders_disagree


def test_pair_label_and_gold_agreement():
    assert PairLabel(0.9, 0.4, "p").orders_disagree and not PairLabel(0.9, 0.6, "p").orders_disagree
    # pairs: label 0.8 vs gold x>y (agree), 0.3 vs x>y (disagree), 0.5 (a tie of the label), gold tie
    out = gold_agreement([0.8, 0.3, 0.5, 0.9], [1.0, 0.5, 0.2, 0.0], [0.0, 0.0, 0.1, 0.0])
    assert out["gold_agreement"] == 0.5 and out["gold_pairs_compared"] == 2 and out["gold_ties"] == 1
    assert out["gold_soft_agreement"] == pytest.approx(round((0.8 + 0.3 + 0.5) / 3, 4))


def test_soft_label_bradley_terry_loss_by_hand():
    from rlhf_lightning.losses import pairwise_loss

    chosen = torch.tensor([1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0])
    loss, metrics = pairwise_loss(chosen, rejected, target=torch.tensor([0.75, 0.5]))
    # pair 1, z = 1: -(0.75 log s(1) + 0.25 log s(-1)) = 0.75*0.3132617 + 0.25*1.3132617 = 0.5632617
    # pair 2, z = 0, p = 1/2: log 2 = 0.6931472; mean = 0.6282044
    assert loss.item() == pytest.approx((0.5632617 + 0.6931472) / 2, abs=1e-6)
    loss.backward()
    # dL/dz = (sigmoid(z) - p) / 2: (0.7310586 - 0.75) / 2 and (0.5 - 0.5) / 2
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.0094707, 0.0]), atol=1e-6, rtol=0)
    assert metrics["accuracy"].item() == 0.5
    hard, _ = pairwise_loss(chosen, rejected)
    ones, _ = pairwise_loss(chosen, rejected, target=torch.ones(2))
    assert ones.item() == pytest.approx(hard.item())


def test_probability_field_in_records_and_batches(tmp_path):
    from rlhf_lightning.data.collate import PreferenceCollator
    from rlhf_lightning.data.records import Location, RecordError, parse_preference

    loc = Location("f.jsonl", 3)
    ex = parse_preference({"prompt": "p", "chosen": "a", "rejected": "b", "probability": 0.7}, loc)
    assert ex.probability == 0.7
    for bad in (1.5, -0.1, "0.7", True):
        with pytest.raises(RecordError, match=r"f.jsonl:3: field 'probability' must be a number in \[0, 1\]"):
            parse_preference({"prompt": "p", "chosen": "a", "rejected": "b", "probability": bad}, loc)
    feats = [
        {
            "chosen_input_ids": [5, 6],
            "chosen_labels": [-100, 6],
            "rejected_input_ids": [5, 7],
            "rejected_labels": [-100, 7],
            "probability": p,
        }
        for p in (0.7, None)
    ]
    batch = PreferenceCollator(pad_token_id=0)(feats)
    torch.testing.assert_close(batch["probability"], torch.tensor([0.7, 1.0]))


class Uniform(nn.Module):
    """Uniform next-token logits; records every sequence it reads."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        self.seen += ["".join(chr(i) for i in row if i > 1) for row in input_ids.tolist()]
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))


def test_critique_feedback_scores_each_response_alone(monkeypatch):
    from rlhf_lightning.cai import feedback

    p = Principle("good", "Bad?", "Fix.")
    q = FeedbackQuestion(mode="critique", no_problems="ok")
    const = Constitution((p,), feedback=q, chat=ChatFormat(template=False, human="U:", assistant="S:"))
    assert const.choice_principles == (p,)  # every principle can be asked under in critique mode
    model = Uniform()
    lp = feedback.no_problem_logprobs(model, CharTokenizer(), ["q", "q"], ["x", "y"], [p, p], const)
    # " ok" is three tokens, each 1/128 under uniform logits
    torch.testing.assert_close(lp, torch.full((2,), 3 * math.log(1 / V)))
    assert sorted(model.seen) == ["U: q\n\nS: x\n\nU: Bad?\n\nS: ok", "U: q\n\nS: y\n\nU: Bad?\n\nS: ok"]
    # P(x better) = sigmoid(logit q_x - logit q_y): q = (0.8, 0.5) -> odds 4:1 -> 0.8; (0.9, 0.6) -> 9/1.5 = 6 -> 6/7
    fake = torch.tensor([0.8, 0.5, 0.9, 0.6]).log()  # pair by pair: x, then y
    monkeypatch.setattr(feedback, "no_problem_logprobs", lambda *args: fake)
    labels = feedback.label_pairs(None, CharTokenizer(), ["q", "q"], [("x", "y"), ("x", "y")], [p, p], const)
    assert [lab.probability for lab in labels] == pytest.approx([0.8, 6 / 7])
    assert not any(lab.orders_disagree for lab in labels) and labels[0].p_xy == labels[0].p_yx


def test_critique_feedback_under_all_principles_multiplies_the_q(monkeypatch):
    from rlhf_lightning.cai import feedback

    p, r = Principle("good", "Bad?", "Fix."), Principle("kind", "Unkind?", "Be kind.")
    q = FeedbackQuestion(mode="critique", no_problems="ok", principles="all")
    const = Constitution((p, r), feedback=q, chat=ChatFormat(template=False, human="U:", assistant="S:"))
    groups = feedback.draw_choice_principles(const, 2, seed=0)
    assert groups == [(p, r), (p, r)]
    asked = []

    def fake(model, tok, requests, responses, principles, *args):
        asked.extend(zip(responses, [pr.name for pr in principles], strict=True))
        # q: x under good 0.8, under kind 0.5 -> Q_x 0.4; y: 0.5 and 0.5 -> Q_y 0.25
        table = {("x", "good"): 0.8, ("x", "kind"): 0.5, ("y", "good"): 0.5, ("y", "kind"): 0.5}
        return torch.tensor([table[a] for a in zip(responses, [pr.name for pr in principles], strict=True)]).log()

    monkeypatch.setattr(feedback, "no_problem_logprobs", fake)
    (label,) = feedback.label_pairs(None, CharTokenizer(), ["q"], [("x", "y")], groups[:1], const)
    assert sorted(asked) == [("x", "good"), ("x", "kind"), ("y", "good"), ("y", "kind")]
    # odds Q_x = 0.4/0.6 = 2/3, Q_y = 0.25/0.75 = 1/3: P = (2/3) / (2/3 + 1/3) = 2/3
    assert label.probability == pytest.approx(2 / 3) and label.principle == "good+kind"


class QuestionJudge(Judge):
    """Prefers the option holding ``x`` 3:1 when asked "Which is better?", has no preference when
    asked anything else; no position bias."""

    def next_token_logits(self, text: str) -> torch.Tensor:
        logits = torch.zeros(V)
        if "better" in text:
            logits[ord("A" if text.find("A x") >= 0 else "B")] += math.log(3)
        return logits


def test_choice_feedback_under_all_principles_averages_the_questions():
    q = FeedbackQuestion("{prompt}\n{options}\n{choice}", ("A", "B"), "", principles="all")
    p, r = Principle("good", "Bad?", "Fix.", "Which is better?"), Principle("kind", "?", "!", "Which is kinder?")
    const = Constitution((p, r), feedback=q, chat=ChatFormat(template=False, human="U:", assistant="S:"))
    judge = QuestionJudge()
    (label,) = label_pairs(judge, CharTokenizer(), ["q"], [("x", "y")], [(p, r)], const)
    # either order: 3/4 under "better", 1/2 under "kinder" -> 5/8
    assert label.p_xy == pytest.approx(5 / 8) and label.p_yx == pytest.approx(5 / 8)
    assert label.principle == "good+kind" and len(judge.seen) == 8  # 2 principles x 2 orders x 2 labels
    (one,) = label_pairs(judge, CharTokenizer(), ["q"], [("x", "y")], [p], const)
    assert one.probability == pytest.approx(3 / 4) and one.principle == "good"


class OffsetCharTokenizer(CharTokenizer):
    """CharTokenizer that also gives character offsets, as fast tokenizers do."""

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        out = super().__call__(text, add_special_tokens)
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def test_per_sentence_critique_scores_the_verdicts_only():
    from rlhf_lightning.cai import feedback

    p = Principle("good", "Bad?", "Fix.")
    q = FeedbackQuestion(mode="critique", no_problems="{sentence} (ok)")
    const = Constitution((p,), feedback=q, chat=ChatFormat(template=False, human="U:", assistant="S:"))
    model = Uniform()
    lp = feedback.no_problem_logprobs(model, OffsetCharTokenizer(), ["q"] * 2, ["a. b", "c."], [p, p], const)
    # " a. (ok) b (ok)": two verdicts "(ok)" of 4 characters each are scored, the copies and the
    # spaces are not; the mean over the sentences, so one verdict's worth each
    torch.testing.assert_close(lp, torch.tensor([4.0, 4.0]) * math.log(1 / V))
    assert model.seen == ["U: q\n\nS: a. b\n\nU: Bad?\n\nS: a. (ok) b (ok)", "U: q\n\nS: c.\n\nU: Bad?\n\nS: c. (ok)"]
    # a model that likes "k" after "o" (odds 4 against each other character) raises every verdict
    table = torch.zeros(V, V)
    table[ord("o"), ord("k")] = math.log(4)
    lp2 = feedback.no_problem_logprobs(Bigram(table), OffsetCharTokenizer(), ["q"], ["c."], [p], const)
    assert lp2.item() == pytest.approx(3 * math.log(1 / V) + math.log(4 / (V + 3)))


def test_scored_tokens_with_a_real_tokenizer(tokenizer):
    from rlhf_lightning.cai.feedback import scored_tokens
    from rlhf_lightning.cai.prompts import no_problem_critique

    text, spans = no_problem_critique("The plot was dull. It was fun.", "{sentence} (ok)")
    ids, mask = scored_tokens(tokenizer, text, spans)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    scored = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert scored.replace(" ", "") == "(ok)(ok)"
    # A verdict before its sentence: the space the tokenizer attaches to the sentence's first
    # word belongs to no verdict, so that word is not scored.
    text, spans = no_problem_critique("The plot was dull. It was fun.", "(ok) {sentence}")
    ids, mask = scored_tokens(tokenizer, " " + text, [(a + 1, b + 1) for a, b in spans])
    scored = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert scored.replace(" ", "") == "(ok)(ok)"
    with pytest.raises(ValueError, match="empty"):
        scored_tokens(tokenizer, "", [])
