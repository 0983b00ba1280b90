"""Fully sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Lightning's ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` hands
each system a device mesh; :meth:`RLHFSystem.configure_model` then shards its models with
:func:`shard`: the trained ones, and the frozen reference and reward model, which gather
their weights block by block for each forward like the trained ones. FSDP2 runs on CUDA
with NCCL and on the CPU with gloo, so the same code is tested on two CPU processes.

Every forward of a sharded model all-gathers, so the ranks run the same forwards in the
same order (equal batch counts, as the distributed samplers give). Two things need more:

* **sampling** (:func:`full_parameters`): the decode loop's forwards must not each gather
  the weights, since ranks stop at different steps (their rows end with EOS at different
  times) and a forward that one rank runs alone waits forever. The weights are gathered
  once before decoding and freed after it, so decoding runs without collectives;
* **export** (:func:`gathered_copy`): the full state dict is gathered on rank 0, which
  writes the ``save_pretrained`` directory from a plain copy.

Checkpoints are Lightning's: a directory in which each rank writes its shards
(``torch.distributed.checkpoint``), read back in place on resume. That reader asks for
every weight of the system, so a checkpoint that :func:`holds_shards` keeps the frozen
reference, which the other checkpoints leave to be reloaded from its export.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2-managed modules of ``model`` in module order (the same on every rank)."""
    if not torch.distributed.is_available():  # a torch build without distributed: nothing is sharded
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a part of it) is managed by FSDP2."""
    return bool(fsdp_modules(model))


def holds_shards(state: Mapping[str, Any]) -> bool:
    """Whether a state dict holds FSDP2 shards (``DTensor``), as a sharded checkpoint's does."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in state.values())


_RESHARD_ROOT = "_rlhf_reshard_root"  # set on a root by shard(): whether it reshards after forward


def shard(model: nn.Module, mesh, frozen: bool = False) -> nn.Module:
    """``fully_shard`` each transformer block of ``model`` (``_no_split_modules``), then the whole.

    One all-gather per block keeps the peak memory of a forward at about one block's full
    weights; the root group holds the rest (embeddings, a tied LM head, the final norm,
    score heads). ``mesh``: a 1-D device mesh of the data-parallel ranks.

    ``model`` may be a wrapper around a ``transformers`` model (the reward model, a
    critic): the wrapper is then the root, so its forward gathers what the blocks do not
    hold, whichever inner module it calls. Methods other than ``forward`` that the
    training step calls are named in the wrapper's ``fsdp_forward_methods`` and get the
    same gathering (``register_fsdp_forward_method``). LoRA layers injected into the
    blocks are sharded with them (frozen and trained weights in one group; only the
    trained ones get gradients to reduce).

    ``frozen``: a model that only runs forwards (reference, reward model) frees its root
    group's gathered weights after each forward too; a trained root keeps them for the
    backward that follows (FSDP2's default).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks = set()
    for m in model.modules():
        blocks.update(getattr(m, "_no_split_modules", None) or ())
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True if frozen else None)
    model.__dict__[_RESHARD_ROOT] = frozen
    for method in getattr(model, "fsdp_forward_methods", ()):
        register_fsdp_forward_method(model, method)
    return model


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Every rank holds ``model``'s full weights inside; a no-op for a model that is not sharded.

    A collective: every rank enters together. Inside, forwards run no collective at all,
    so ranks may run different numbers of them (sampling until their own rows end).
    Reshard-after-forward goes back to :func:`shard`'s setting (blocks on, a trained root off).
    """
    modules = fsdp_modules(model)
    if not modules:
        yield model
        return
    for m in modules:
        m.unshard()
    modules[0].set_reshard_after_forward(False)  # modules[0] is the root: recursive
    try:
        yield model
    finally:
        modules[0].set_reshard_after_forward(True)
        root_reshards = bool(modules[0].__dict__.get(_RESHARD_ROOT, False))  # FSDP2's default for a root: False
        modules[0].set_reshard_after_forward(root_reshards, recurse=False)
        for m in modules:
            m.reshard()


def sharded_root(model: nn.Module, within: nn.Module | None = None) -> tuple[nn.Module, str] | None:
    """The FSDP2 root that holds ``model`` and ``model``'s key prefix in it, or None when
    ``model`` is not sharded. ``model`` may be the root itself, or a part of a root among
    ``within``'s modules (the ``transformers`` model inside a sharded reward model)."""
    if not torch.distributed.is_available():  # a torch build without distributed: nothing is sharded
        return None
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return model, ""
    for root in within.modules() if within is not None else ():
        if isinstance(root, FSDPModule):  # module order: a root comes before its blocks
            for name, m in root.named_modules():
                if m is model:
                    return root, f"{name}."
    if is_sharded(model):
        raise ValueError(f"{type(model).__name__} is partly sharded: pass the system as `within` to find its root")
    return None


def gathered_copy(model: nn.Module, within: nn.Module | None = None) -> nn.Module | None:
    """``model`` itself when it is not sharded; else a plain copy with the full weights on rank 0
    and None on the other ranks (a collective: every rank calls it).

    ``model`` is a ``transformers`` model that :func:`shard` was given, or one inside a
    sharded wrapper among ``within``'s modules (see :func:`sharded_root`). The copy is the
    model's own ``transformers`` class, built without initialising weights and given the
    gathered tensors (on the CPU, in their training dtype); a model with a LoRA adapter
    gets the same adapter (``peft`` config) first, so the copy exports like the original.
    """
    found = sharded_root(model, within)
    if found is None:
        return model
    root, prefix = found
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from transformers.initialization import no_init_weights

    from rlhf_lightning.models.adapters import copy_lora, lora_wrapper

    # Only rank 0 receives the tensors (cpu_offload), one at a time.
    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    # fully_shard turns the class into FSDP<cls>; a part inside a sharded wrapper keeps its own.
    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(b for b in cls.__bases__ if not issubclass(b, FSDPModule))
    with no_init_weights():
        plain = cls(model.config)
    if lora_wrapper(model) is not None:
        copy_lora(model, plain)
    plain.load_state_dict(state, assign=True)
    if getattr(model, "generation_config", None) is not None:  # the checkpoint's, not one rebuilt from config
        plain.generation_config = copy.deepcopy(model.generation_config)
    if hasattr(plain, "tie_weights"):  # assign replaced the shared tensor by two copies
        plain.tie_weights()
    return plain.train(model.training)
