"""FSDP2 for the large sizes: every Transformer block is its own shard unit, then the root.

Checkpoints stay full, unsharded tensors, so a run can move between DDP and FSDP and between
world sizes. The full-state calls are collectives: every rank must make them.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard


def shard(model: nn.Module) -> nn.Module:
    """Shard each block of every ModuleList (the Transformer blocks), then the rest."""
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)
    return model


def full_model_state(model: nn.Module, sharded: bool, everywhere: bool = False) -> dict:
    """Unsharded weights: on rank 0 in CPU memory, or on every rank's device (everywhere)."""
    if not sharded:
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    return get_model_state_dict(model, options=options)


def full_optim_state(model: nn.Module, opt, sharded: bool) -> dict:
    if not sharded:
        return opt.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, opt, options=options)


def load_optim_state(model: nn.Module, opt, state: dict, sharded: bool) -> None:
    if not sharded:
        opt.load_state_dict(state)
        return
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
