"""The module's own random stream in checkpoints: every rank's generator state, so that a resumed
run draws what an uninterrupted one would have drawn (noise, timesteps, reference drops)."""

from __future__ import annotations

import torch

__all__ = ["generator_states", "restore_generator_state"]


def generator_states(module) -> torch.Tensor:
    """Every rank's ``noise_generator`` state, (world, n) bytes: Lightning writes rank 0's dict only,
    so the states are gathered there."""
    state = module.noise_generator.get_state()
    if module._trainer is not None and module.trainer.world_size > 1:
        state = module.all_gather(state.to(module.device)).cpu()
    return state.reshape(-1, state.shape[-1])


def restore_generator_state(module, states: torch.Tensor | None) -> None:
    """This rank's state of ``states`` (as :func:`generator_states` saved them) into the module's
    generator; a rank that did not exist when they were saved starts a fresh stream of its own."""
    if states is None:
        return
    states = states.reshape(-1, states.shape[-1])
    if module.global_rank < len(states):
        module.noise_generator.set_state(states[module.global_rank].clone())
    else:
        module.noise_generator.manual_seed(torch.initial_seed() + module.global_rank + 1_000_003 * module.global_step)
