"""Image metrics of the Leffa paper (Sec. 4.1, "Metrics."): FID, KID, SSIM, LPIPS; and PSNR and
the paired metrics inside a mask, which later try-on papers report beside them.

Follows the VtonEval tool that the Leffa release points to (docs/design.md, "Evaluation"):
FID and KID with clean-fid in mode "clean" (KID reported x1000), SSIM with torchmetrics
(data_range 1.0 on [0, 1] images, averaged per image), LPIPS with the `lpips` package, and
ground truth resized to the prediction's size with LANCZOS when the sizes differ. PSNR is
computed per image (data range 1) and averaged over images; the masked metrics average the
per-pixel error, SSIM map and LPIPS spatial map over the mask's pixels (`paired_scores`).

Offline by design: nothing here downloads. clean-fid's Inception and LPIPS' torchvision
backbone are read from local files (argument or environment variable); a missing file is
one error that says what to put where. Any `torch.nn.Module` can replace Inception (tests
use a tiny random CNN), and `lpips_backbone="random"` builds LPIPS on a random backbone:
both exist for tests only and give numbers that are not comparable with the paper.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import lpips
import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.utils import ResizeDataset
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from leffa import images
from leffa.errors import UserError
from leffa.schema import SampleKey

INCEPTION_ENV = "LEFFA_INCEPTION_WEIGHTS"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)
LPIPS_ENV = "LEFFA_LPIPS_BACKBONE"
# The torchvision ImageNet weights that `lpips` would otherwise download (IMAGENET1K_V1).
LPIPS_BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
KID_SCALE = 1000.0  # VtonEval and the paper's tables report KID x 1000
# The smallest image side LPIPS v0.1 accepts per trunk: below it a pooling layer of the trunk has no
# window left (tests/test_hostile_probe.py checks these against the networks). SSIM's 11x11 window
# needs 6 pixels, under every one of these.
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16, "squeeze": 17}
# Ground truth is resized to the prediction's size; an aspect ratio further than this (relative) from
# the prediction's would be squashed, not rounded (DeepFashion's 750x1101 to 352x512 is 0.9%).
ASPECT_TOLERANCE = 0.01
# What PIL raises for a file that is no image, truncated, corrupt or over its pixel limit
# (UnidentifiedImageError is an OSError); DataLoader workers re-raise them with the same type.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# --------------------------------------------------------------------------- files and pairs


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files directly inside `folder` (flat, like the VtonEval folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return files


def match_pairs(
    pred_files: list[Path], gt_files: list[Path], paired: bool = False
) -> list[tuple[Path, Path]]:
    """Pair each prediction with the ground truth of its target.

    A prediction named exactly like a ground-truth file (same stem) is that file's prediction.
    Any other is named by its sample key (`leffa predict` writes `<key>.png`; the grammar is
    `leffa.schema`) and is paired with the ground truth named by the key's target id: the
    person for try-on, the target pose for pose transfer, never the reference. With `paired`
    (the paired try-on protocol) unpaired keys are refused. A prediction without ground truth,
    or whose name is neither a ground-truth stem nor a key, is an error naming it.
    """
    gt_by_stem = {p.stem: p for p in gt_files}
    pairs, missing, unpaired = [], [], []
    for pred in pred_files:
        key = _prediction_key(pred, gt_by_stem)
        if paired and key is not None and key.pairing == "unpaired":
            unpaired.append(pred.name)
            continue
        gt = gt_by_stem.get(pred.stem) or (gt_by_stem.get(key.target) if key is not None else None)
        if gt is None:
            missing.append(pred.name)
        else:
            pairs.append((pred, gt))
    if unpaired:
        raise UserError(
            f"--paired: {len(unpaired)} of {len(pred_files)} predictions in {pred_files[0].parent} are "
            f"unpaired samples (e.g. {unpaired[0]}); evaluate them without --paired, or keep only "
            "the keys whose pairing is 'paired'"
        )
    if missing:
        raise UserError(
            f"{len(missing)} of {len(pred_files)} predictions have no ground truth named by their "
            f"target id in {gt_files[0].parent}: {', '.join(missing[:5])}"
            + (", ..." if len(missing) > 5 else "")
        )
    return pairs


def _prediction_key(pred: Path, gt_by_stem: dict[str, Path]) -> SampleKey | None:
    """The sample key a prediction is named by; None for a plain ground-truth stem that is no key."""
    try:
        return SampleKey.parse_any(pred.stem)
    except UserError as error:
        if pred.stem in gt_by_stem:
            return None
        raise UserError(
            f"prediction {pred} is named neither like a ground-truth image nor by a sample key: {error}"
        ) from None


def image_size(path: Path) -> tuple[int, int]:
    """Upright (width, height) read from the file header and EXIF orientation; an unreadable file is
    an error naming it."""
    try:
        return images.image_size(path)
    except DECODE_ERRORS as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> UserError:
    return UserError(f"{path} is not a readable image ({type(error).__name__}: {error}); remove or replace it")


def raise_for_unreadable(files: list[Path], error: Exception) -> None:
    """After `error` in a decoding loop: a UserError naming the first file that fails to decode,
    else `error` itself (headers are checked up front; a truncated body only shows when decoded)."""
    for path in files:
        try:
            _read_rgb(path)
        except DECODE_ERRORS as decode_error:
            raise _unreadable(path, decode_error) from None
    raise error


def common_size(files: list[Path]) -> tuple[int, int]:
    """The (width, height) shared by all `files`; a differing file is an error naming it."""
    size = image_size(files[0])
    for path in files[1:]:
        other = image_size(path)
        if other != size:
            raise UserError(
                f"predictions must share one size: {files[0].name} is {size[0]}x{size[1]}, "
                f"{path.name} is {other[0]}x{other[1]}"
            )
    return size


def check_lpips_size(size: tuple[int, int], net: str, example: Path) -> None:
    """A UserError, before any network is loaded, when images of ``size`` (width, height; ``example``
    is one) are under LPIPS ``net``'s minimum side."""
    minimum = LPIPS_MIN_SIDE.get(net)  # an unknown net is load_lpips' error
    if minimum is not None and min(size) < minimum:
        raise UserError(
            f"LPIPS {net} needs images of at least {minimum}x{minimum} pixels, but the predictions are "
            f"{size[0]}x{size[1]} (e.g. {example}); evaluate larger predictions, or drop --paired / "
            "--fid-ref for FID and KID only"
        )


def aspect_mismatches(sizes: dict[Path, tuple[int, int]], size: tuple[int, int],
                      tolerance: float = ASPECT_TOLERANCE) -> list[Path]:
    """The files of ``sizes`` (path -> (width, height)) whose aspect ratio differs from ``size``'s by
    more than ``tolerance`` (relative): resizing them to ``size`` would squash them."""
    ratio = size[0] / size[1]
    return [path for path, (w, h) in sizes.items() if abs(w / h - ratio) > tolerance * ratio]


class ResizeTo:
    """Resize an HxWx3 uint8 array to (width, height) with LANCZOS when it differs (VtonEval).

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, size: tuple[int, int]):
        self.size = tuple(size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if (image.shape[1], image.shape[0]) == self.size:
            return image
        return np.asarray(Image.fromarray(image).resize(self.size, Image.LANCZOS))


# ---------------------------------------------------------------- offline feature extractors


def load_inception(path: str | Path | None = None, device: str = "cpu") -> torch.nn.Module:
    """clean-fid's Inception (torchscript `inception-2015-12-05.pt`) from a local file.

    `path` (or `$LEFFA_INCEPTION_WEIGHTS`) is the file or the folder holding it. Built as
    clean-fid's "clean" mode builds it (`InceptionV3W(resize_inside=False)`) but with
    `download=False`, so clean-fid's download helper is never reached.
    """
    path = path or os.environ.get(INCEPTION_ENV)
    hint = (
        f"download {INCEPTION_URL} on a machine with network, then pass --inception PATH "
        f"or set {INCEPTION_ENV}=PATH"
    )
    if not path:
        raise UserError(f"no Inception weights for FID/KID given: {hint}")
    path = Path(path)
    if path.is_dir():
        path = path / INCEPTION_FILE
    if not path.is_file():
        raise UserError(f"Inception weights for FID/KID not found at {path}: {hint}")
    if path.name != INCEPTION_FILE:
        raise UserError(f"clean-fid loads Inception by the name {INCEPTION_FILE}; rename {path}")
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but it is clean-fid's format
        warnings.simplefilter("ignore", FutureWarning)
        model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    return model.to(device).eval()


def load_lpips(
    net: str = "alex", backbone: str | Path | None = None, device: str = "cpu"
) -> lpips.LPIPS:
    """LPIPS v0.1 (Zhang et al., 2018) built without any download.

    `lpips.LPIPS(pnet_rand=True, pretrained=False)` builds the torchvision trunk with random
    weights and skips the linear layers; we then load the linear layers that ship inside the
    package (`lpips/weights/v0.1/<net>.pth`) and the trunk from `backbone` (or
    `$LEFFA_LPIPS_BACKBONE`): a torchvision ImageNet state dict (`features.*` keys).
    `backbone="random"` keeps the random trunk: for tests only, not meaningful numbers.
    """
    if net not in LPIPS_BACKBONE_URLS:
        raise UserError(f"unknown LPIPS net {net!r}; choose from {sorted(LPIPS_BACKBONE_URLS)}")
    backbone = backbone or os.environ.get(LPIPS_ENV)
    hint = (
        f"download {LPIPS_BACKBONE_URLS[net]} on a machine with network, then pass "
        f"--lpips-backbone PATH or set {LPIPS_ENV}=PATH"
    )
    if not backbone:
        raise UserError(f"no LPIPS {net} backbone weights given: {hint}")
    if str(backbone) != "random" and not Path(backbone).is_file():
        raise UserError(f"LPIPS {net} backbone weights not found at {backbone}: {hint}")

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    lin_path = Path(lpips_linear_weights(net))
    lin = torch.load(lin_path, map_location="cpu", weights_only=True)
    unexpected = model.load_state_dict(lin, strict=False).unexpected_keys
    if unexpected:
        raise UserError(f"{lin_path} has keys LPIPS does not know: {unexpected[:3]}")

    if str(backbone) != "random":
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        # lpips keeps torchvision's layer indices in its slices: `slice2.3.weight` = `features.3.weight`
        names = {name: "features." + name.split(".", 1)[1] for name in model.net.state_dict()}
        absent = [key for key in names.values() if key not in state]
        if absent:
            raise UserError(f"{backbone} is not a torchvision {net} state dict: no key {absent[0]!r}")
        model.net.load_state_dict({name: state[key] for name, key in names.items()})
    return model.requires_grad_(False).to(device).eval()


# ------------------------------------------------------------------------- FID and KID


def extract_features(
    files: list[Path],
    model: torch.nn.Module,
    size: tuple[int, int],
    batch_size: int = 32,
    device: str = "cpu",
    num_workers: int = 0,
    description: str = "",
) -> np.ndarray:
    """(N, D) features of `files` exactly as clean-fid's "clean" mode computes them.

    clean-fid reads RGB, applies our LANCZOS resize to `size` (VtonEval's step), resizes to
    299x299 with PIL bicubic in float and passes the (B, 3, 299, 299) float batch in
    [0, 255] to `model`. This is `cleanfid.fid.get_files_features` with each file read by
    `leffa.images` (upright, 8-bit, transparent pixels on white; the same pixels as clean-fid's
    reader for 8-bit RGB files without EXIF orientation).
    """
    model = model.to(device).eval()
    dataset = _CleanFidFiles(files, mode="clean")
    dataset.custom_image_tranform = ResizeTo(size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        batches = tqdm(loader, desc=description)
        return np.concatenate([cleanfid_fid.get_batch_features(b, model, torch.device(device)) for b in batches])
    except DECODE_ERRORS as error:
        raise_for_unreadable(files, error)


class _CleanFidFiles(ResizeDataset):
    """clean-fid's dataset of image files, reading each with `_read_rgb` instead of PIL's
    `Image.open(path).convert("RGB")`; the rest of its `__getitem__` as clean-fid 0.1.35 has it."""

    def __getitem__(self, i: int) -> torch.Tensor:
        resized = self.fn_resize(self.custom_image_tranform(np.asarray(_read_rgb(self.files[i]))))
        return self.transforms(np.array(resized)) * 255 if resized.dtype == np.uint8 else self.transforms(resized)


def fid_kid(
    pred_feats: np.ndarray, ref_feats: np.ndarray, kid: bool = True, seed: int = 0
) -> dict[str, float]:
    """FID (Frechet distance) and KID x 1000 between two feature sets, by clean-fid.

    These are the functions `cleanfid.fid.compute_fid` / `compute_kid` end in for two
    folders; we call them on features computed once, because `compute_kid` in clean-fid
    0.1.35 takes no custom extractor (it would build, and download, its own Inception).
    KID's random subsets use numpy's global RNG: we seed it and restore it afterwards.
    Features go in as float64: KID is a small difference of O(1) kernel sums, which float32
    (what the extractors return) rounds visibly.
    """
    pred_feats, ref_feats = pred_feats.astype(np.float64), ref_feats.astype(np.float64)
    out = {"fid": float(cleanfid_fid.fid_from_feats(pred_feats, ref_feats))}
    if kid:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            # argument order as VtonEval: compute_kid(gt_folder, pred_folder)
            out["kid_x1000"] = KID_SCALE * cleanfid_fid.kernel_distance(ref_feats, pred_feats)
        finally:
            np.random.set_state(state)
    return out


# ------------------------------------------------------------- PSNR, SSIM and LPIPS, per pair

PAIRED_METRICS = ("psnr", "ssim", "lpips")
MASKED_SUFFIX = "_mask"  # psnr_mask, ssim_mask, lpips_mask: the same metric inside the mask
MASK_THRESHOLD = 128  # a mask pixel (8-bit grey, transparent = black) >= this is in the generated region


def _read_rgb(path: Path | ShardMask) -> Image.Image:
    return images.read_image(_source(path), "RGB")[0]


def read_mask(source: Path | ShardMask, size: tuple[int, int]) -> torch.Tensor:
    """A (1, H, W) float 0/1 mask at ``size`` (width, height): the file read as 8-bit grey (EXIF
    orientation applied, transparent pixels black), resized with nearest neighbour (pixel centres
    aligned, as ``leffa.data.transforms`` resizes masks) and 1 where the grey value is >= 128."""
    grey = np.asarray(images.read_image(_source(source), "L", background=images.BLACK)[0])
    width, height = size
    if grey.shape != (height, width):  # floor((i + 0.5) * size_in / size_out), in integers
        rows = (2 * np.arange(height) + 1) * grey.shape[0] // (2 * height)
        cols = (2 * np.arange(width) + 1) * grey.shape[1] // (2 * width)
        grey = grey[rows[:, None], cols]
    return torch.from_numpy((grey >= MASK_THRESHOLD).astype(np.float32))[None]


class PairDataset(Dataset):
    """(prediction, ground truth[, mask]) as (3, H, W) floats in [0, 1] (mask (1, H, W) 0/1); the
    ground truth resized to the prediction with LANCZOS, the mask with nearest neighbour."""

    def __init__(self, pairs: list[tuple[Path, Path]], masks: list[Path | ShardMask] | None = None):
        self.pairs = pairs
        self.masks = masks

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        pred, gt = (_read_rgb(path) for path in self.pairs[i])
        if gt.size != pred.size:
            gt = gt.resize(pred.size, Image.LANCZOS)
        if self.masks is None:
            return to_tensor(pred), to_tensor(gt)
        return to_tensor(pred), to_tensor(gt), read_mask(self.masks[i], pred.size)


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of (B,) mean squared errors of [0, 1] images: 10 log10(1 / MSE); inf where MSE is 0."""
    return -10 * torch.log10(mse)


def _lpips_map(model: lpips.LPIPS, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """LPIPS' spatial map (B, 1, H, W): what ``lpips.LPIPS(spatial=True)`` returns, from the same
    network (each layer's distance map upsampled bilinearly to the input size, summed over layers)."""
    spatial = model.spatial
    model.spatial = True
    try:
        return model(pred, gt, normalize=True)
    finally:
        model.spatial = spatial


@torch.no_grad()
def paired_scores(
    pairs: list[tuple[Path, Path]],
    lpips_model: torch.nn.Module | None,
    masks: list[Path | ShardMask] | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """Per-pair scores, in the order of ``pairs`` (float64 arrays of len(pairs)).

    On images x (prediction) and y (ground truth resized to it) in [0, 1], 3 channels, H x W:

    - ``psnr``: 10 log10(1 / MSE), MSE = the mean of (x - y)^2 over all 3HW values (inf when 0);
    - ``ssim``: torchmetrics' SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1):
      the mean of its SSIM map S (3 x H x W, the images reflect-padded by 5 pixels);
    - ``lpips`` (with ``lpips_model``): LPIPS v0.1 with inputs mapped to [-1, 1].

    With ``masks`` (one per pair; M = the 0/1 mask at H x W, |M| its pixel count), the same inside it:

    - ``psnr_mask``: 10 log10(1 / MSE_M), MSE_M = sum over the mask's pixels and 3 channels of
      (x - y)^2 / (3 |M|);
    - ``ssim_mask``: sum of S over the mask's pixels and 3 channels / (3 |M|) (all-ones mask: ``ssim``);
    - ``lpips_mask``: sum over the mask's pixels of L / |M|, L the LPIPS spatial map (1 x H x W, the
      ``spatial=True`` output of the same network).

    An empty mask gives NaN in the masked scores of its pair.
    """
    scores: dict[str, list[torch.Tensor]] = {}

    def add(name: str, values: torch.Tensor) -> None:
        scores.setdefault(name, []).append(values.double().cpu())

    loader = DataLoader(PairDataset(pairs, masks), batch_size=batch_size, num_workers=num_workers)
    try:
        for batch in tqdm(loader, desc="PSNR/SSIM/LPIPS"):
            pred, gt = batch[0].to(device), batch[1].to(device)
            squared = (pred - gt).pow(2).double()
            add("psnr", _psnr(squared.flatten(1).mean(1)))
            ssim, ssim_map = structural_similarity_index_measure(
                pred, gt, data_range=1.0, reduction="none", return_full_image=True
            )
            add("ssim", ssim)
            if lpips_model is not None:
                # (B, 1, 1, 1) -> (B,); normalize=True maps [0, 1] to [-1, 1]
                add("lpips", lpips_model(pred, gt, normalize=True).flatten())
            if masks is not None:
                mask = batch[2].to(device)  # (B, 1, H, W)
                pixels = mask.flatten(1).sum(1).double()  # |M|; 0 gives NaN below
                add("psnr_mask", _psnr((squared * mask).flatten(1).sum(1) / (3 * pixels)))
                add("ssim_mask", (ssim_map.double() * mask).flatten(1).sum(1) / (3 * pixels))
                if lpips_model is not None:
                    spatial = _lpips_map(lpips_model, pred, gt).double()
                    add("lpips_mask", (spatial * mask).flatten(1).sum(1) / pixels)
    except DECODE_ERRORS as error:
        raise_for_unreadable([path for pair in pairs for path in pair] + list(masks or []), error)
    return {name: torch.cat(values).numpy() for name, values in scores.items()}


def mean_scores(
    scores: dict[str, np.ndarray], selection: np.ndarray | list[int] | None = None
) -> dict[str, float | None]:
    """The mean of each per-pair score over ``selection`` (indices; default all). Masked scores
    average over the pairs whose mask is not empty (None when there are none)."""
    out = {}
    for name, values in scores.items():
        values = values if selection is None else values[np.asarray(selection, dtype=int)]
        if name.endswith(MASKED_SUFFIX):
            values = values[~np.isnan(values)]
        out[name] = float(values.mean()) if len(values) else None
    return out


def ssim_lpips(
    pairs: list[tuple[Path, Path]],
    lpips_model: torch.nn.Module | None,
    batch_size: int = 16,
    device: str = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """Per-image mean PSNR, SSIM (torchmetrics, data_range 1.0) and LPIPS (inputs mapped to [-1, 1])."""
    scores = paired_scores(pairs, lpips_model, batch_size=batch_size, device=device, num_workers=num_workers)
    return mean_scores(scores)


# ------------------------------------------------------------------------------ masks


@dataclass(frozen=True)
class ShardMask:
    """A sample's ``mask.png`` read from a shard: its bytes, and where they come from (for messages)."""

    shard: str
    key: str
    data: bytes

    def __str__(self) -> str:
        return f"{self.shard} (sample {self.key}, mask.png)"


def _source(path: Path | ShardMask) -> Path | io.BytesIO:
    return io.BytesIO(path.data) if isinstance(path, ShardMask) else path


def mask_size(source: Path | ShardMask) -> tuple[int, int]:
    """Upright (width, height) of a mask file or shard member; an unreadable one is an error naming it."""
    try:
        return images.image_size(_source(source))
    except DECODE_ERRORS as error:
        raise _unreadable(source, error) from None


def _match_masks(pairs: list[tuple[Path, Path]], by_prediction: dict, by_ground_truth: dict) -> tuple[list, list]:
    """(the mask of each pair: the one named like its prediction, else like its ground truth; the
    names of the predictions that have none)."""
    found, missing = [], []
    for pred, gt in pairs:
        mask = by_prediction.get(pred.stem) or by_ground_truth.get(gt.stem)
        (found if mask else missing).append(mask or pred.name)
    return found, missing


def masks_from_folder(folder: str | Path, pairs: list[tuple[Path, Path]]) -> list[Path]:
    """The mask of each pair from ``folder``: the image named like the prediction (its sample key),
    else like the ground truth (the target id); a pair without one is an error naming the count."""
    by_stem = {path.stem: path for path in list_images(folder)}
    found, missing = _match_masks(pairs, by_stem, by_stem)
    if missing:
        raise UserError(
            f"--masks {folder}: {len(missing)} of {len(pairs)} predictions have no mask named like the "
            f"prediction or its ground truth (e.g. {missing[0]}; expected {Path(missing[0]).stem} or "
            "the ground truth's name with an image extension)"
        )
    return found


def masks_from_shards(spec: str, pairs: list[tuple[Path, Path]]) -> list[ShardMask]:
    """The mask of each pair from the shards of ``spec`` (``SHARDS@split``; default split test): the
    ``mask.png`` of the sample whose key names the prediction, else of a sample whose target id is
    the ground truth's name (a paired sample first); a pair without one is an error."""
    from leffa.data.shards import resolve_shards  # the shard reader: imported only when used
    from leffa.data.tar_samples import index_samples

    shards = resolve_shards(spec, default_splits=("test",))
    by_key: dict[str, ShardMask] = {}
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for key, members in index_samples(tar):
                    member = dict(members).get("mask.png")
                    if member is not None:
                        by_key[key] = ShardMask(shard, key, tar.extractfile(member).read())
        except (tarfile.TarError, OSError) as error:
            raise UserError(
                f"--masks-from-shards: cannot read shard {shard} ({type(error).__name__}: {error})"
            ) from None
    by_target: dict[str, ShardMask] = {}
    for key, mask in sorted(by_key.items(), key=lambda item: "_paired_" not in item[0]):  # paired first
        parsed = prediction_key(Path(key))
        if parsed is not None:
            by_target.setdefault(parsed.target, mask)
    found, missing = _match_masks(pairs, by_key, by_target)
    if missing:
        raise UserError(
            f"--masks-from-shards {spec}: {len(missing)} of {len(pairs)} predictions have no sample with "
            f"a mask.png in {len(shards)} shards, neither by key nor by target id (e.g. {missing[0]})"
        )
    return found


# --------------------------------------------------------------- exclusion and categories


def prediction_key(path: Path) -> SampleKey | None:
    """The sample key a file is named by (its stem), or None when its name is no key."""
    try:
        return SampleKey.parse_any(path.stem)
    except UserError:
        return None


def read_exclude_list(path: str | Path) -> dict[str, set[str]]:
    """The entries of a ``--exclude`` file, each with the names it leaves out.

    One name per line: an image name such as ``00010_00.jpg`` (a folder and the extension may be
    given) or a sample key. An entry (the name without folder and image extension) leaves out the
    images of that stem and, when it is a key, every image of its target id. Blank lines and lines
    starting with ``#`` are skipped.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--exclude {path}: cannot read it ({type(error).__name__}: {error})") from None
    entries: dict[str, set[str]] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = Path(line.replace("\\", "/")).name
        stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
        key = prediction_key(Path(stem + ".png"))
        entries[stem] = {stem} | ({key.target} if key is not None else set())
    return entries


def is_excluded(path: Path, names: set[str]) -> bool:
    """Whether an image is left out: its stem, or the target id of the key it is named by, is listed."""
    if path.stem in names:
        return True
    key = prediction_key(path)
    return key is not None and key.target in names


# ------------------------------------------------------------------------- provenance


def library_versions() -> dict[str, str]:
    """Versions of the libraries the metrics are computed with (for the results file)."""
    versions = {}
    for name in ("clean-fid", "torchmetrics", "lpips", "torch", "torchvision", "numpy", "scipy", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def lpips_linear_weights(net: str) -> str:
    """The file of LPIPS v0.1's linear layers for ``net`` that ``load_lpips`` reads (inside the package)."""
    return str(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth")
