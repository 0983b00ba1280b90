"""Every random-number stream of a training process, as checkpoint-safe values.

A resumed run continues the very same run only if the streams that training draws from
(dropout, rollout sampling, anything in numpy or ``random``) are where they were when the
checkpoint was written. :func:`rng_state` captures torch (CPU and every CUDA device),
numpy and Python's ``random`` as tensors and plain numbers (loadable by
``torch.load(weights_only=True)``); :func:`gather_ranks` collects one per rank,
since every rank draws its own stream; :func:`set_rng_state` puts one back.
"""

from __future__ import annotations

import random
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional: its stream is then not part of the state
    np = None


def rng_state() -> dict[str, Any]:
    """This process's RNG streams: ``torch``, ``cuda`` (one per device, when present), ``numpy``, ``python``."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore streams captured by :func:`rng_state` (a CUDA state is set only where CUDA is)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and np is not None:
        s = state["numpy"]
        keys = s["keys"].numpy().astype(np.uint32)
        np.random.set_state((s["name"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))


def gather_ranks(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective under several processes: call it on every rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
