"""Which attention layers take part in the Leffa loss (paper Sec. 3.3: a layer whose token grid has
h rows at an image of height H takes part when h / H > theta_resolution), the image sizes the model
can take, and the Leffa settings that would switch the loss off or turn it around: each refused in
one line before training, and the selection said once at start.
"""

from __future__ import annotations

import math

from lightning.pytorch.utilities import rank_zero_info

from leffa.errors import UserError

__all__ = ["check_leffa_settings", "check_theta_timestep", "check_image_size", "leffa_layers", "leffa_grids",
           "describe_leffa"]


def check_leffa_settings(lambda_leffa: float, theta_resolution: float, tau: float) -> None:
    """One error line for a Leffa setting that switches the loss off or turns it around."""
    if not (math.isfinite(lambda_leffa) and lambda_leffa >= 0):
        raise UserError(f"model.lambda_leffa must be finite and >= 0 (a negative weight maximises the warp loss), "
                        f"got {lambda_leffa}")
    if not (math.isfinite(tau) and tau > 0):
        raise UserError(f"model.tau must be finite and > 0 (the softmax temperature of the Leffa flow), got {tau}")
    if not 0 <= theta_resolution < 1:
        raise UserError(f"model.theta_resolution must be in [0, 1) (layers whose token grid height h has h / "
                        f"image height > theta_resolution take part; no layer has h >= the image height), "
                        f"got {theta_resolution}")


def check_theta_timestep(theta_timestep: int, steps: int) -> None:
    """One error line for a ``model.theta_timestep`` outside the scheduler's ``steps``."""
    if not 1 <= theta_timestep <= steps:
        raise UserError(f"model.theta_timestep must be in 1..{steps} (samples with t < theta_timestep take part in "
                        f"the Leffa loss; the scheduler has {steps} timesteps), got {theta_timestep}")


def check_image_size(module, height: int, width: int, stage: str) -> None:
    """Refuse, in one line, images that the VAE cannot encode and decode to their own size and, when
    fitting with the Leffa loss, a size at which no attention layer takes part (or where a Leffa
    layer's grid is not whole: ``concat_unet``'s person|garment seam inside a token); then say
    once which layers and what share of the samples take part in the Leffa loss.

    The UNets themselves take any latent size: a level whose input does not halve evenly is
    rounded up by the stride-2 convolutions and brought back to the skip connection's size on the
    way up (diffusers' ``upsample_size``), so the VAE's multiple is the one size rule."""
    factor = module.vae_scale_factor()
    bad = [(side, value) for side, value in (("height", height), ("width", width)) if value % factor]
    if bad:
        sides = " and ".join(f"data.{side} {value}" for side, value in bad)
        near = ", ".join(f"data.{side} {value // factor * factor or factor} or {(value // factor + 1) * factor}"
                         for side, value in bad)
        raise UserError(f"{sides}: image sides must be a multiple of {factor} (the VAE encodes {factor}x{factor} "
                        f"pixels to one latent pixel; otherwise its output has another size): use {near}")
    if stage != "fit" or not module.hparams.use_leffa_loss:
        return
    layers = leffa_grids(module, height, width)
    theta = module.hparams.theta_resolution
    selected = {name: grid for name, grid in layers.items() if grid[0] / height > theta}
    if not selected:
        finest = max((grid[0] for grid in layers.values()), default=0)
        raise UserError(f"model.theta_resolution {theta:g} selects no attention layer for the Leffa loss at "
                        f"data.height {height}: the finest token grid has {finest} rows ({finest}/{height} = "
                        f"{finest / height:g}, not above it); lower model.theta_resolution or set "
                        f"model.use_leffa_loss: false")
    for name, (rows, columns) in selected.items():
        if columns != int(columns):
            raise UserError(f"{type(module.denoiser).__name__}: at data.width {width} the Leffa layer {name} has a "
                            f"token grid {columns:g} tokens wide, not a whole number (a seam between images laid "
                            f"side by side falls inside a token); choose a data.width whose latent width "
                            f"({width // factor}) halves evenly down to that layer")
    rank_zero_info(describe_leffa(module, height, width, {name: (r, int(c)) for name, (r, c) in selected.items()}))

def leffa_layers(module, height: int, width: int) -> dict[str, tuple[int, int]]:
    """The attention layers that take part in the Leffa loss at ``height`` x ``width`` images, by
    the name the Leffa captures have, with their token grids (the person half's for
    ``concat_unet``): Sec. 3.3's h / height > theta_resolution."""
    theta = module.hparams.theta_resolution
    return {name: (rows, int(columns)) for name, (rows, columns) in leffa_grids(module, height, width).items()
            if rows / height > theta}

def leffa_grids(module, height: int, width: int) -> dict[str, tuple[int, float]]:
    """Every attention layer that can capture for the Leffa loss, with its token grid at this
    image size, as the architecture says (``ReferenceDenoiser.leffa_grids``: worked out from its
    networks' structure). A width that is not a whole number (``concat_unet``'s person half where
    the seam falls inside a token) is refused by :func:`check_image_size`."""
    factor = module.vae_scale_factor()
    return module.denoiser.leffa_grids((height // factor, width // factor))


def describe_leffa(module, height: int, width: int, layers: dict[str, tuple[int, int]]) -> str:
    """One line: which attention layers (grouped by attention block) and what share of the
    timesteps and samples take part in the Leffa loss."""
    blocks: dict[str, list[tuple[int, int]]] = {}
    for name, grid in layers.items():
        blocks.setdefault(name.split(".transformer_blocks.")[0], []).append(tuple(grid))
    named = ", ".join(f"{block} ({'' if len(grids) == 1 else f'{len(grids)} blocks, '}{grids[0][0]}x{grids[0][1]})"
                      for block, grids in blocks.items())
    hp, steps = module.hparams, module.scheduler.config.num_train_timesteps
    share = min(hp.theta_timestep, steps) / steps
    return (f"Leffa loss on {len(layers)} attention layers at {height}x{width} (theta_resolution "
            f"{hp.theta_resolution:g}): {named}; samples with t < {hp.theta_timestep} of {steps} "
            f"({share:.0%}) and their reference kept ({1 - hp.p_drop_ref:.0%}) take part, "
            f"weight lambda_leffa {hp.lambda_leffa:g}")
