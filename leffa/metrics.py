"""Image metrics of the Leffa paper (Sec. 4.1, "Metrics."): FID, KID, SSIM, LPIPS.

Follows the VtonEval tool that the Leffa release points to (docs/design.md, "Evaluation"):
FID and KID with clean-fid in mode "clean" (KID reported x1000), SSIM with torchmetrics
(data_range 1.0 on [0, 1] images, averaged per image), LPIPS with the `lpips` package, and
ground truth resized to the prediction's size with LANCZOS when the sizes differ.

Offline by design: nothing here downloads. clean-fid's Inception and LPIPS' torchvision
backbone are read from local files (argument or environment variable); a missing file is
one error that says what to put where. Any `torch.nn.Module` can replace Inception (tests
use a tiny random CNN), and `lpips_backbone="random"` builds LPIPS on a random backbone:
both exist for tests only and give numbers that are not comparable with the paper.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.utils import ResizeDataset
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchmetrics.image import StructuralSimilarityIndexMeasure
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
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
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


# ---------------------------------------------------------------------- SSIM and LPIPS


def _read_rgb(path: Path) -> Image.Image:
    return images.read_image(path, "RGB")[0]


class PairDataset(Dataset):
    """(prediction, ground truth) as (3, H, W) floats in [0, 1]; gt resized to the prediction."""

    def __init__(self, pairs: list[tuple[Path, Path]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pred, gt = (_read_rgb(path) for path in self.pairs[i])
        if gt.size != pred.size:
            gt = gt.resize(pred.size, Image.LANCZOS)
        return to_tensor(pred), to_tensor(gt)


@torch.no_grad()
def ssim_lpips(
    pairs: list[tuple[Path, Path]],
    lpips_model: torch.nn.Module | None,
    batch_size: int = 16,
    device: str = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """Per-image mean SSIM (torchmetrics, data_range 1.0) and LPIPS (inputs mapped to [-1, 1])."""
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    lpips_values = []
    loader = DataLoader(PairDataset(pairs), batch_size=batch_size, num_workers=num_workers)
    try:
        for pred, gt in tqdm(loader, desc="SSIM/LPIPS"):
            pred, gt = pred.to(device), gt.to(device)
            ssim.update(pred, gt)
            if lpips_model is not None:
                # (B, 1, 1, 1) -> (B,); normalize=True maps [0, 1] to [-1, 1]
                lpips_values.append(lpips_model(pred, gt, normalize=True).flatten().cpu())
    except DECODE_ERRORS as error:
        raise_for_unreadable([path for pair in pairs for path in pair], error)
    out = {"ssim": float(ssim.compute())}
    if lpips_model is not None:
        out["lpips"] = float(torch.cat(lpips_values).mean())
    return out
