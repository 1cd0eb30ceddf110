"""Which attention layers take part in the Leffa loss (paper Sec. 3.3: a layer whose token grid has
h rows at an image of height H takes part when h / H > theta_resolution), the image sizes the model
can take, and the Leffa settings that would switch the loss off or turn it around: each refused in
one line before training, and the selection said once at start.
"""

from __future__ import annotations

import math

from lightning.pytorch.utilities import rank_zero_info

from leffa.attention import ConcatAttention, WidthConcatAttention
from leffa.errors import UserError

__all__ = ["check_leffa_settings", "check_image_size", "leffa_layers", "leffa_grids", "describe_leffa"]


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


def _unet_level(name: str, levels: int) -> int:
    """How many times a ``UNet2DConditionModel`` of ``levels`` down blocks has halved the latent at
    the attention layer ``name`` (``down_blocks.i...``, ``mid_block...``, ``up_blocks.i...``)."""
    block, _, rest = name.partition(".")
    if block == "mid_block":
        return levels - 1
    index = int(rest.split(".", 1)[0])
    return index if block == "down_blocks" else levels - 1 - index


def _halved(size: tuple[int, int], times: int) -> tuple[int, int]:
    h, w = size
    for _ in range(times):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def check_image_size(module, height: int, width: int, stage: str) -> None:
    """Refuse, in one line, images that the VAE cannot encode and decode to their own size and, when
    fitting with the Leffa loss, a size at which no attention layer takes part (or, for
    ``concat_unet``, where the person|garment seam falls inside a Leffa layer's token); then say
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
            raise UserError(f"concat_unet: at data.width {width} the person|garment seam of the Leffa layer {name} "
                            f"(a {rows}x{int(2 * columns)} token grid over both halves) falls inside a token; "
                            f"choose a data.width whose latent width ({width // factor}) halves evenly down to "
                            f"that layer")
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
    image size, worked out from the UNet's structure: block i of n works on the latent halved i
    times (rounded up, as the stride-2 convolutions do), the middle block n - 1 times, up block
    i n - 1 - i times. For ``concat_unet`` the grid is the person half's, whose width is not a
    whole number where the seam falls inside a token."""
    factor = module.vae_scale_factor()
    latent = (height // factor, width // factor)
    grids: dict[str, tuple[int, float]] = {}
    for unet in module.denoiser.components().values():
        processors = getattr(unet, "attn_processors", {})
        for name, processor in processors.items():
            if isinstance(processor, ConcatAttention):
                grid = _halved(latent, _unet_level(name, len(unet.down_blocks)))
                grids[processor.name] = (grid[0], float(grid[1]))
            elif isinstance(processor, WidthConcatAttention):
                rows, columns = _halved((latent[0], 2 * latent[1]), _unet_level(name, len(unet.down_blocks)))
                grids[processor.name] = (rows, columns / 2)
    return grids

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
