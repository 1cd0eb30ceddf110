"""Local-only loading of diffusers components (UNet, VAE, scheduler) from an SD1.5- or SDXL-style folder.

Nothing is ever fetched from a hub: a path must exist on disk, and a missing one is one clear
error that says what to put where.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from leffa.errors import MissingFileError, UserError

__all__ = ["read_config", "component_location", "load_unet", "load_vae", "load_vae_folder", "load_scheduler",
           "vae_latent_channels", "vae_scale_factor", "SD15_SCHEDULER"]

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"

# SD1.5's training noise schedule (scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


def read_config(value: dict | str | os.PathLike | None) -> dict | None:
    """An inline component config: a dict as it is, or a path to a JSON/YAML file read into one.

    Paths given in a YAML config arrive as jsonargparse paths, already resolved against the
    config file's folder (``os.fspath`` gives the absolute path).
    """
    if value is None or isinstance(value, dict):
        return value
    path = Path(os.fspath(value))
    if not path.is_file():
        raise MissingFileError(f"component config file not found: {path}")
    loaded = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise UserError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def component_location(path: str | Path, component: str) -> tuple[Path, str | None]:
    """Where a component's ``config.json`` lies: ``<path>/<component>/`` (pipeline folder) or ``<path>/``.

    Raises MissingFileError naming the expected files when neither exists.
    """
    root = Path(path).expanduser()
    if (root / component / "config.json").is_file() or (root / component / "scheduler_config.json").is_file():
        return root, component
    if (root / "config.json").is_file() or (root / "scheduler_config.json").is_file():
        return root, None
    raise MissingFileError(
        f"no diffusers {component} at {root}: expected {root / component / 'config.json'} (an SD1.5(-inpainting) "
        f"or SDXL(-inpainting) folder saved with diffusers, e.g. stable-diffusion-inpainting/) or {root / 'config.json'}"
    )


def _load_component(cls, component: str, path, config: dict | None):
    if path is not None:
        root, sub = component_location(path, component)
        return cls.from_pretrained(root, subfolder=sub, local_files_only=True)
    if config is not None:
        return cls(**config)
    raise UserError(f"give the {component} either as a local folder (pretrained path) or as an inline "
                     f"config ({component}_config)")


def load_unet(path: str | Path | None = None, config: dict | None = None) -> UNet2DConditionModel:
    """A UNet from a local folder, or a randomly initialised one from an inline diffusers config."""
    return _load_component(UNet2DConditionModel, "unet", path, config)


def load_vae(path: str | Path | None = None, config: dict | None = None) -> AutoencoderKL:
    """A VAE from a local folder, or a randomly initialised one from an inline diffusers config."""
    return _load_component(AutoencoderKL, "vae", path, config)


def load_vae_folder(path: str | Path) -> AutoencoderKL:
    """A trained VAE from a local diffusers ``AutoencoderKL`` folder (``config.json`` and safetensors
    weights, as ``save_pretrained`` writes them; ``<path>/vae/`` of a pipeline folder also works).

    Raises MissingFileError naming the expected files when they are not there.
    """
    root = Path(path).expanduser()
    if (root / "vae" / "config.json").is_file():
        root = root / "vae"
    if not (root / "config.json").is_file() or not (root / VAE_WEIGHTS).is_file():
        raise MissingFileError(
            f"no diffusers VAE at {root}: expected {root / 'config.json'} and {root / VAE_WEIGHTS} (an "
            f"AutoencoderKL folder written by save_pretrained, e.g. python -m replicate.train_tiny_vae --out {root})"
        )
    return AutoencoderKL.from_pretrained(root, local_files_only=True, use_safetensors=True)


def load_scheduler(path: str | Path | None = None, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The DDPM training scheduler: the folder's own ``scheduler/`` when there is one, else SD1.5's
    settings. ``zero_terminal_snr``: betas rescaled to zero terminal SNR (Lin et al. 2023), as the
    released code loads its scheduler for an SDXL base (``rescale_betas_zero_snr=True``)."""
    if path is not None:
        root = Path(path).expanduser()
        if (root / "scheduler" / "scheduler_config.json").is_file():
            return DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True,
                                                 rescale_betas_zero_snr=zero_terminal_snr)
    return DDPMScheduler(**SD15_SCHEDULER, rescale_betas_zero_snr=zero_terminal_snr)


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Image pixels per latent pixel along each side: 2 ** (VAE levels - 1) (8 for SD1.5's and SDXL's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_latent_channels(pretrained: str | Path | None, config: dict | None, folder: str | Path | None) -> int:
    """The latent channels of the VAE the module loads (``vae_pretrained`` ``folder``, else the
    ``pretrained`` folder's, else ``config``), read from its config alone, so the denoiser can be
    built before the VAE; AutoencoderKL's default (4) where no config says (loading the VAE then
    names what is missing)."""
    if folder is None and pretrained is None:
        return int((config or {}).get("latent_channels", 4))
    root = Path(folder or pretrained).expanduser()
    for file in (root / "vae" / "config.json", root / "config.json"):
        if file.is_file():
            try:
                return int(json.loads(file.read_text()).get("latent_channels", 4))
            except (ValueError, OSError, AttributeError):
                break
    return 4
