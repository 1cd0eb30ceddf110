"""User image files as the user means them (issue 20): 16-bit PNGs scaled to 8 bits, EXIF
orientation applied, transparent pixels composited (photos on white, masks and poses on black),
and a mask or pose whose aspect ratio differs from the person's refused, never stretched; in the
folder converter (`python -m data_prep folder`), in `--data.predict_folder` and in `leffa eval`.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from raw_datasets import decode, read_split

from data_prep.__main__ import main as data_prep_main
from leffa import metrics
from leffa.data.predict_folder import FolderPairs
from leffa.images import ASPECT_TOLERANCE, normalize_image, read_image
from leffa.errors import UserError

H, W = 40, 32
RED, BLUE, GREY = (230, 20, 20), (20, 20, 230), (120, 110, 100)
ORIENTATION = 0x0112


# --------------------------------------------------------------------------- helpers


def grey16(height: int, width: int, value: int) -> Image.Image:
    """A 16-bit grey image (PIL mode I;16) of one value."""
    return Image.fromarray(np.full((height, width), value, np.uint16))


def png16(array: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): colour type 0 grey, 2 RGB, 6 RGBA."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    height, width = array.shape[:2]
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def upright_photo(colour=GREY) -> np.ndarray:
    """(H, W, 3): `colour` with a red 8x8 block at the top-left corner."""
    array = np.empty((H, W, 3), np.uint8)
    array[:] = colour
    array[:8, :8] = RED
    return array


def save_sideways(path: Path, upright: np.ndarray) -> None:
    """Store `upright` as a phone does: rotated a quarter turn counter-clockwise, with EXIF
    orientation 6 (the viewer rotates it 90 degrees clockwise to show it upright)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)


def solid(colour, height=H, width=W) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def upright_mask(height=H, width=W) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[10:30, 8:24] = 255
    return Image.fromarray(mask)


def make_folder(root: Path, **images: Image.Image | None) -> Path:
    """One person `p` and its garment `p` (paired): person/, garment/, mask/, densepose/ PNGs and
    train_pairs.txt (the converter) that the predict folder also reads (it pairs ids). An image
    given as None is left for the test to write."""
    defaults = {"person": solid(GREY), "garment": solid(BLUE), "mask": upright_mask(),
                "densepose": solid((30, 90, 200))}  # fmt: skip
    for folder, image in {**defaults, **images}.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        if image is not None:
            image.save(root / folder / "p.png")
    (root / "train_pairs.txt").write_text("p p\n")
    return root


def convert(src: Path, out: Path) -> tuple[dict, dict]:
    """(decoded train sample, manifest) of `src` through the folder converter."""
    manifest = data_prep_main(["folder", "--src", str(src), "--out", str(out), "--split", "train"])
    ((_, sample),) = read_split(out, "train")
    return decode(sample), manifest


def predict_sample(root: Path, height=H, width=W) -> dict:
    """The one sample of `root` as `--data.predict_folder` gives it: uint8 (H, W, C) arrays."""
    sample = FolderPairs(root, height, width)[0]
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}


# --------------------------------------------------------------------------- 16-bit


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_grey_modes_scale_to_8bit(mode):
    image = grey16(2, 3, 32768).convert(mode) if mode != "I;16B" else Image.frombytes(
        "I;16B", (3, 2), np.full((2, 3), 32768, ">u2").tobytes())  # fmt: skip
    assert image.mode == mode
    for target in ("RGB", "L"):
        out, conversions = normalize_image(image, target)
        assert out.mode == target and abs(int(np.asarray(out).max()) - 128) <= 1, (mode, target)
        assert int(np.asarray(out).min()) == int(np.asarray(out).max())
        assert conversions == ["16bit_to_8bit"]
    white, _ = normalize_image(grey16(1, 1, 65535), "L")
    assert np.asarray(white).item() == 255


def test_16bit_rgb_and_rgba_pngs_come_out_8bit(tmp_path):
    rgb = np.full((2, 3, 3), 32768, np.uint16)
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 65535, np.uint16)], axis=2)
    for name, array, colour_type in (("rgb", rgb, 2), ("rgba", rgba, 6), ("grey", rgb[..., 0], 0)):
        path = tmp_path / f"{name}.png"
        path.write_bytes(png16(array, colour_type))
        image, size = read_image(path, "RGB")
        assert size == (3, 2) and np.abs(np.asarray(image).astype(int) - 128).max() <= 1, name


def test_16bit_person_in_the_converter_and_the_predict_folder(tmp_path):
    src = make_folder(tmp_path / "src", person=grey16(H, W, 32768))
    sample, _ = convert(src, tmp_path / "out")
    assert np.abs(sample["tgt"].astype(int) - 128).max() <= 2  # JPEG in the shard; pure white before
    tgt = predict_sample(src)["tgt"]
    assert np.abs(tgt.astype(int) - 128).max() <= 1


# --------------------------------------------------------------------------- EXIF orientation


def assert_upright(image: np.ndarray, tolerance: int = 12) -> None:
    """The red block of `upright_photo` is at the top-left corner and nowhere else."""
    assert image.shape[:2] == (H, W)
    assert np.abs(image[1:7, 1:7].reshape(-1, 3).mean(0) - RED).max() < tolerance
    for corner in (image[-6:, -6:], image[:6, -6:], image[-6:, :6]):
        assert np.abs(corner.reshape(-1, 3).mean(0) - GREY).max() < tolerance


def test_exif_orientation_applied_by_the_converter(tmp_path):
    src = make_folder(tmp_path / "src", person=None)
    save_sideways(src / "person" / "p.jpg", upright_photo())
    sample, manifest = convert(src, tmp_path / "out")
    assert_upright(sample["tgt"])
    assert sample["meta"]["height"] == H and sample["meta"]["width"] == W
    assert manifest["splits"]["train"]["image_conversions"] == {"exif_orientation": 1}


def test_exif_orientation_applied_in_the_predict_folder(tmp_path):
    src = make_folder(tmp_path / "src", person=None)
    save_sideways(src / "person" / "p.jpg", upright_photo())
    assert_upright(predict_sample(src)["tgt"])


def test_exif_orientation_applied_by_leffa_eval(tmp_path):
    upright = upright_photo()
    pred, gt = tmp_path / "pred.png", tmp_path / "gt.png"
    Image.fromarray(upright).save(pred)
    save_sideways(gt, upright)  # PNG with an eXIf chunk: lossless
    assert metrics.image_size(gt) == (W, H)
    ssim = metrics.ssim_lpips([(pred, gt), (pred, pred)], None, batch_size=1)["ssim"]
    assert ssim == pytest.approx(metrics.ssim_lpips([(pred, pred)], None, batch_size=1)["ssim"], abs=1e-6)

    class Quadrants(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    features = metrics.extract_features([pred, gt], Quadrants(), (W, H), batch_size=2)
    np.testing.assert_allclose(features[0], features[1], atol=1e-3)


# --------------------------------------------------------------------------- aspect ratio


@pytest.mark.parametrize("folder", ["mask", "densepose"])
def test_converter_refuses_a_mask_or_pose_of_another_aspect_ratio(tmp_path, folder):
    wrong = {"mask": upright_mask(H, H), "densepose": solid((30, 90, 200), H, H)}[folder]
    src = make_folder(tmp_path / "src", **{folder: wrong})
    with pytest.raises(UserError, match=rf"{folder}/p.png \(40x40\).*person/p.png \(32x40\)"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_folder_refuses_a_mask_of_another_aspect_ratio(tmp_path):
    src = make_folder(tmp_path / "src", mask=upright_mask(H, H))
    with pytest.raises(UserError, match=r"mask/p.png \(40x40\).*person/p.png \(32x40\)"):
        predict_sample(src)


def test_an_unrotated_phone_photo_no_longer_stretches_its_mask(tmp_path):
    """The sideways photo's stored size is 40x32; its upright mask, 32x40, matches it only upright."""
    src = make_folder(tmp_path / "src", person=None)
    save_sideways(src / "person" / "p.jpg", upright_photo())
    sample, _ = convert(src, tmp_path / "out")
    assert sample["mask"].shape == (H, W) and sample["mask"][20, 16] == 255 and sample["mask"][5, 2] == 0


def test_same_aspect_other_size_and_small_differences_are_resized(tmp_path):
    assert ASPECT_TOLERANCE == 0.03
    # a pose one column short: 31/40 is 3.1% narrower than 32/40, too much
    src = make_folder(tmp_path / "src", mask=upright_mask(2 * H, 2 * W), densepose=solid((30, 90, 200), H, W - 1))
    with pytest.raises(UserError, match="densepose/p.png"):
        convert(src, tmp_path / "out")
    big = 4 * H, 4 * W - 3  # 125/160 is 2.3% narrower: resized, as a mask of twice the size is
    src = make_folder(tmp_path / "src2", mask=upright_mask(2 * H, 2 * W), densepose=solid((30, 90, 200), *big))
    sample, _ = convert(src, tmp_path / "out2")
    assert sample["mask"].shape == (H, W) and sample["densepose"].shape == (H, W, 3)
    assert predict_sample(src)["mask"].shape == (H, W)


# --------------------------------------------------------------------------- transparency


def rgba_garment() -> Image.Image:
    """Blue, opaque on the left half; fully transparent over red on the right half."""
    array = np.zeros((H, W, 4), np.uint8)
    array[:, : W // 2] = (*BLUE, 255)
    array[:, W // 2 :] = (*RED, 0)
    return Image.fromarray(array)


def test_transparent_pixels_become_white_in_the_converter_and_are_counted(tmp_path):
    mask = np.zeros((H, W, 4), np.uint8)
    mask[10:30, 8:24] = 255  # opaque white where to generate; transparent (black under it) elsewhere
    mask[:5, :5, :3] = 255  # white under alpha 0: not generated
    src = make_folder(tmp_path / "src", garment=rgba_garment(), mask=Image.fromarray(mask))
    sample, manifest = convert(src, tmp_path / "out")
    ref = sample["ref"].astype(int)
    assert np.abs(ref[:, -10:] - 255).max() <= 3  # JPEG
    assert np.abs(ref[:, :10] - BLUE).max() <= 6
    assert sample["mask"][20, 16] == 255 and sample["mask"][2, 2] == 0
    assert manifest["splits"]["train"]["image_conversions"] == {"alpha_composited": 2}


def test_transparent_pixels_become_white_in_the_predict_folder(tmp_path):
    src = make_folder(tmp_path / "src", garment=rgba_garment())
    ref = predict_sample(src)["ref"].astype(int)
    assert (ref[:, -10:] == 255).all() and np.abs(ref[:, :10] - BLUE).max() <= 1
    _, conversions = normalize_image(Image.new("RGBA", (2, 2), (9, 9, 9, 255)), "RGB")
    assert conversions == []  # all opaque: nothing composited


def test_a_sideways_jpeg_drafted_for_a_smaller_size_still_covers_it_upright(tmp_path):
    """`read_image` asks libjpeg for a reduced scale of the stored (sideways) image that covers the
    upright target size: 160 x 120 stored as 120 x 160 with orientation 6, for a 40 x 30 target."""
    path = tmp_path / "photo.jpg"
    upright = np.zeros((160, 120, 3), np.uint8)
    upright[:40, :40] = RED
    save_sideways(path, upright)
    image, native = read_image(path, "RGB", draft_size=(40, 30))
    assert native == (120, 160) and image.size == (30, 40)  # drafted by 1/4, upright
    assert np.abs(np.asarray(image)[2:8, 2:8].reshape(-1, 3).mean(0) - RED).max() < 20


def test_an_unreadable_predict_folder_image_is_one_error_naming_it(tmp_path):
    src = make_folder(tmp_path / "src")
    data = (src / "person" / "p.png").read_bytes()
    (src / "person" / "p.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot read image .*person/p.png"):
        predict_sample(src)
