"""The synthetic set's reference texture families: identifiable ones encode position by
construction, the periodic one repeats; every family shares a sample's geometry."""

import argparse

import numpy as np
import pytest

from data_prep import synthetic
from data_prep.synthetic_textures import IDENTIFIABLE, PRINT_COLOURS, TEXTURES, prints

H, W = 64, 48


@pytest.mark.parametrize("family", ["ramp", "smooth"])
@pytest.mark.parametrize("seed", range(4))
def test_colour_names_the_position(family, seed):
    image = TEXTURES[family](np.random.default_rng(seed), H, W)
    red, green = image[..., 0], image[..., 1]
    # red depends on x only and is strictly monotonic in it; green likewise in y
    assert np.allclose(red, red[:1]) and np.allclose(green, green[:, :1])
    assert (np.abs(np.diff(red[0])) > 0).all() and (np.sign(np.diff(red[0])) == np.sign(red[0, -1] - red[0, 0])).all()
    assert (np.abs(np.diff(green[:, 0])) > 0).all()
    assert (np.sign(np.diff(green[:, 0])) == np.sign(green[-1, 0] - green[0, 0])).all()
    pairs = {(r, g) for r, g in zip(red.ravel().round(9), green.ravel().round(9))}
    assert len(pairs) == H * W  # so every pixel's (red, green) is unique


@pytest.mark.parametrize("seed", range(4))
def test_prints_have_distinct_colours_on_a_plain_ground(seed):
    image = prints(np.random.default_rng(seed), H, W)
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) == PRINT_COLOURS + 1  # the ground and one colour per print
    ground = colours[counts.argmax()]
    assert counts.max() > 0.5 * H * W
    for i, a in enumerate(colours):
        for b in colours[i + 1:]:
            assert np.abs(a - b).max() >= 0.25
    assert not np.array_equal(ground, colours[counts.argmin()])


def _shift_difference(image: np.ndarray, dx: int, dy: int) -> float:
    a = image[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)]
    b = image[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return float(np.abs(a - b).mean())


def repeat_ratio(image: np.ndarray, far: int = 6, reach: int = 16) -> float:
    """How well the image matches itself moved by at least ``far`` pixels (the best such shift),
    relative to a 1-pixel move: about 1 or less when the texture repeats, several times more when
    every place looks different."""
    near = np.mean([_shift_difference(image, dx, dy) for dx, dy in ((1, 0), (0, 1), (1, 1), (-1, 1))])
    best_far = min(_shift_difference(image, dx, dy) for dx in range(-reach, reach + 1)
                   for dy in range(-reach, reach + 1) if max(abs(dx), abs(dy)) >= far)
    return best_far / near


@pytest.mark.parametrize("seed", range(6))
def test_the_periodic_family_repeats_and_the_identifiable_ones_do_not(seed):
    ratios = {family: repeat_ratio(TEXTURES[family](np.random.default_rng(seed), H, W)) for family in TEXTURES}
    assert ratios["periodic"] < 1.5, ratios
    for family in ("ramp", "smooth", "prints"):
        assert ratios[family] > 2.5, ratios


def test_families_share_the_geometry_and_differ_in_the_reference():
    args = argparse.Namespace(seed=3, count=2, height=H, width=W, texture="periodic")
    samples = {}
    for family in TEXTURES:
        args.texture = family
        spec = synthetic.list_samples(args, "train")[1]
        samples[family] = synthetic.load_sample(spec)
    assert set(IDENTIFIABLE) < set(TEXTURES)
    first = samples["periodic"]
    for family, sample in samples.items():
        for member in ("mask.png", "flow.npy"):
            assert sample[member] == first[member], (family, member)
        if family != "periodic":
            assert sample["ref.jpg"] != first["ref.jpg"], family
