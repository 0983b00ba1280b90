"""SL-CAI data: sample a response, then critique and revise it under randomly drawn principles.

For every prompt (Bai et al. 2022, section 3.1):

1. sample a response from the policy on the prompt (as the RL stages would);
2. for each of ``rounds`` rounds draw a principle, ask the model for a critique of the current
   response under it, then for a revision (prompts: :mod:`rlhf_lightning.cai.prompts`); the
   revision becomes the current response.

Each step is one batched generation over every prompt still in play. A prompt is dropped, and
counted under its reason, when the critique or the revision has no EOS within the budget
(``critique_no_eos``, ``revision_no_eos``), when a revision is empty (``revision_empty``), or
when the final revision is the original response again (``revision_identical``). Kept prompts
give an SFT record ``{prompt, response: final revision}`` and a preference record ``{prompt,
chosen: final revision, rejected: original response}``; every prompt, kept or dropped, gives a
transcript record with the principles drawn and every intermediate text.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lightning.cai.constitution import Constitution, load_constitution
from rlhf_lightning.cai.generate import complete, read_prompt_records, write_jsonl
from rlhf_lightning.cai.prompts import critique_prompt, prompt_messages, revision_prompt
from rlhf_lightning.generation import SamplingConfig

log = logging.getLogger(__name__)

DROP_REASONS = ("critique_no_eos", "revision_no_eos", "revision_empty", "revision_identical")


@dataclass
class ReviseSettings:
    """Settings of ``rlhf-lightning cai-revise`` and of the ``cai_revise`` pipeline stage."""

    rounds: int = 1
    max_prompts: int | None = None
    batch_size: int = 64
    max_prompt_length: int = 1024  # longer prompts are cut from the left (and counted)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64))
    seed: int = 0


def draw_principles(constitution: Constitution, n_prompts: int, rounds: int, seed: int) -> list[list[int]]:
    """``[prompt][round]`` indices of the principles, drawn uniformly with ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [[rng.randrange(len(constitution.principles)) for _ in range(rounds)] for _ in range(n_prompts)]


@torch.no_grad()
def generate_revisions(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    constitution: Constitution,
    settings: ReviseSettings,
) -> dict[str, Any]:
    """Run SL-CAI on ``prompts`` (records with ``text``, see ``read_prompt_records``).

    Returns:
        ``{"sft": [...], "preferences": [...], "transcripts": [...], "counts": {...}}``; the
        counts hold ``prompts``, ``kept``, one entry per drop reason, ``response_no_eos``
        (first responses without EOS: kept, since a revision may fix them) and
        ``prompts_truncated``.
    """
    if settings.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {settings.rounds}")
    torch.manual_seed(settings.seed)
    drawn = draw_principles(constitution, len(prompts), settings.rounds, settings.seed)

    def gen(texts: list[str]) -> list:
        return complete(model, tokenizer, texts, settings.sampling, settings.batch_size, settings.max_prompt_length)

    counts = dict.fromkeys(("prompts", "kept", *DROP_REASONS, "response_no_eos", "prompts_truncated"), 0)
    counts["prompts"] = len(prompts)
    transcripts: list[dict[str, Any]] = []
    for rec in prompts:
        transcripts.append({"prompt": rec["text"], "rounds": [], "dropped": None})
    first = gen([r["text"] for r in prompts])
    for t, c in zip(transcripts, first, strict=True):
        t["response"] = c.text
        counts["response_no_eos"] += not c.ended
        counts["prompts_truncated"] += c.prompt_truncated
    current = {i: c.text for i, c in enumerate(first)}
    chats = [prompt_messages(r) for r in prompts]
    for rnd in range(settings.rounds):
        live = sorted(current)
        principles = {i: constitution.principles[drawn[i][rnd]] for i in live}
        asks = [critique_prompt(chats[i], current[i], principles[i], constitution, tokenizer) for i in live]
        critiques = dict(zip(live, gen(asks), strict=True))
        for i in live:
            c = critiques[i]
            counts["prompts_truncated"] += c.prompt_truncated
            transcripts[i]["rounds"].append({"principle": principles[i].name, "critique": c.text})
            if not c.ended:
                transcripts[i]["dropped"] = "critique_no_eos"
                del current[i]
        live = sorted(current)
        asks = [
            revision_prompt(chats[i], current[i], critiques[i].text, principles[i], constitution, tokenizer)
            for i in live
        ]
        for i, c in zip(live, gen(asks), strict=True):
            counts["prompts_truncated"] += c.prompt_truncated
            transcripts[i]["rounds"][-1]["revision"] = c.text
            reason = "revision_no_eos" if not c.ended else "revision_empty" if not c.text.strip() else None
            if reason:
                transcripts[i]["dropped"] = reason
                del current[i]
            else:
                current[i] = c.text
    sft, preferences = [], []
    for i in sorted(current):
        original, revision = transcripts[i]["response"], current[i]
        if revision.strip() == original.strip():
            transcripts[i]["dropped"] = "revision_identical"
            continue
        sft.append({"prompt": prompts[i]["text"], "response": revision})
        preferences.append({"prompt": prompts[i]["text"], "chosen": revision, "rejected": original})
    for t in transcripts:
        if t["dropped"]:
            counts[t["dropped"]] += 1
    counts["kept"] = len(sft)
    return {"sft": sft, "preferences": preferences, "transcripts": transcripts, "counts": counts}


def run_revise(
    policy: str,
    prompts_file: str,
    constitution: str,
    out_dir: str,
    settings: ReviseSettings | None = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Load the policy export, run :func:`generate_revisions`, write ``sft.jsonl``,
    ``preferences.jsonl``, ``transcripts.jsonl`` and ``stats.json`` under ``out_dir``."""
    from rlhf_lightning.eval.sampling import load_frozen_lm
    from rlhf_lightning.models import load_tokenizer

    settings = settings or ReviseSettings()
    start = time.perf_counter()
    const = load_constitution(constitution)
    tok = load_tokenizer(tokenizer or policy)
    model = load_frozen_lm(policy, tok)
    records = read_prompt_records(prompts_file, tok, settings.max_prompts)
    out = generate_revisions(model, tok, records, const, settings)
    root = Path(out_dir)
    for name in ("sft", "preferences", "transcripts"):
        write_jsonl(root / f"{name}.jsonl", out[name])
    stats = {
        "counts": out["counts"],
        "policy": policy,
        "constitution": constitution,
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if not out["sft"]:  # the transcripts are written: they show why
        raise RuntimeError(f"SL-CAI kept no revision of {len(records)} prompts: {out['counts']} (see {root})")
    (root / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("SL-CAI: %s (%.0f s)", out["counts"], stats["seconds"])
    return stats
