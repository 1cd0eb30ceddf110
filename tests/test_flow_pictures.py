"""Attention-flow pictures."""

import torch

from leffa.flow_pictures import flow_figure, flow_to_rgb, layer_flows, query_attention, warp
from leffa.losses import coordinate_map
from leffa.module import LeffaModule
from leffa.testing import make_batch


def test_identity_flow_warps_to_the_reference_and_colours_by_position():
    ref = torch.rand(1, 3, 16, 12) * 2 - 1
    identity = coordinate_map(16, 12).view(1, 16, 12, 2)
    torch.testing.assert_close(warp(ref, identity), ref, atol=1e-5, rtol=0)
    rgb = flow_to_rgb(identity)
    assert rgb.shape == (1, 3, 16, 12)
    assert rgb[0, 0, 0, 0] == 0 and rgb[0, 0, 0, -1] == 1 and rgb[0, 1, -1, 0] == 1


def test_layer_flows_query_attention_and_figure(tiny_configs):
    torch.manual_seed(0)
    module = LeffaModule(**tiny_configs, conditioning="released").eval()
    batch = make_batch()
    flows = layer_flows(module, batch, timestep=100)
    assert len(flows) == 7  # every layer of the tiny UNet is above 1/32 at 64x48
    name, item = next(iter(flows.items()))
    h, w = item["capture"].grid
    assert item["flow"].shape == (2, h, w, 2) and item["flow"].abs().max() <= 1
    attn = query_attention(item["capture"], [(0.5, 0.5), (0.1, 0.9)], tau=2.0)
    assert attn.shape == (2, 2, h, w)
    torch.testing.assert_close(attn.sum(dim=(2, 3)), torch.ones(2, 2), atol=1e-5, rtol=0)
    # the head-averaged attention of a query point, times the coordinates, is that point's flow
    centre = (min(int(0.5 * h), h - 1), min(int(0.5 * w), w - 1))
    from_attn = (attn[:, 0].reshape(2, -1, 1) * coordinate_map(h, w)).sum(1)
    torch.testing.assert_close(from_attn, item["flow"][:, centre[0], centre[1]], atol=1e-5, rtol=0)
    tiles = flow_figure(batch, item["flow"], attn)
    assert tiles.shape == (2, 6, 3, 64, 48) and 0 <= tiles.min() and tiles.max() <= 1



def affine_flow(height, width, shift_px=0.0, image_width=48):
    """(1, height, width, 2) coordinates of the pixels (align_corners=True), x shifted by ``shift_px``
    pixels of an image ``image_width`` wide."""
    flow = coordinate_map(height, width).view(1, height, width, 2).clone()
    flow[..., 0] += shift_px * 2 / (image_width - 1)
    return flow


def test_end_point_error_in_pixels_over_the_defined_region():
    from leffa.flow_pictures import end_point_error

    truth = affine_flow(64, 48)
    truth[:, :10] = float("nan")  # undefined outside the garment: left out
    # an affine flow at the token grid, upsampled as in Eq. 4, is the flow itself
    assert end_point_error(affine_flow(8, 6), truth) < 1e-4
    assert abs(end_point_error(affine_flow(8, 6, shift_px=1.0), truth) - 1.0) < 1e-4
    centre = torch.zeros(1, 4, 3, 2)  # every pixel at the reference centre
    defined = ~torch.isnan(truth[..., 0])
    expected = torch.hypot(truth[..., 0] * 47 / 2, truth[..., 1] * 63 / 2)[defined].mean()
    assert abs(end_point_error(centre, truth) - expected.item()) < 1e-4


def test_figure_shows_the_ground_truth_flow_beside_the_attention_flow():
    batch = make_batch(batch_size=1)
    truth = affine_flow(64, 48)
    truth[:, :, :10] = float("nan")
    batch["flow"] = truth
    flow = affine_flow(8, 6)
    attention = torch.rand(1, 3, 8, 6)
    tiles = flow_figure(batch, flow, attention)
    assert tiles.shape == (1, 8, 3, 64, 48)  # target, reference, flow, ground truth, warped, 3 attentions
    ground_truth = tiles[0, 3]
    torch.testing.assert_close(ground_truth[:, :, 10:], flow_to_rgb(truth)[0, :, :, 10:])
    assert ground_truth[:, :, :10].abs().sum() == 0  # black where undefined
    without = flow_figure({k: v for k, v in batch.items() if k != "flow"}, flow, attention)
    assert without.shape == (1, 7, 3, 64, 48)


class RecordingLogger:
    """The part of a Lightning logger that FlowPictures uses: a folder and log_metrics."""

    def __init__(self, log_dir):
        self.log_dir, self.metrics = str(log_dir), []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))


def test_flow_pictures_log_the_end_point_error_against_the_ground_truth(tiny_configs, tmp_path, one_thread):
    from types import SimpleNamespace

    from PIL import Image

    from leffa.callbacks import FlowPictures
    from leffa.flow_pictures import end_point_error

    torch.manual_seed(0)
    module = LeffaModule(**tiny_configs, conditioning="released").eval()
    batch = make_batch(batch_size=3)
    truth = affine_flow(64, 48, shift_px=3.0).expand(3, -1, -1, -1).clone()
    truth[:, :8] = float("nan")
    batch["flow"] = truth
    logger = RecordingLogger(tmp_path)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, logger=logger, global_step=7,
                              default_root_dir=str(tmp_path))
    callback = FlowPictures(num_samples=2, timestep=100)
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    (step, metrics), = logger.metrics
    flows = layer_flows(module, {k: v[:2] for k, v in batch.items()}, timestep=100)
    per_layer = [end_point_error(item["flow"], truth[:2]) for item in flows.values()]
    assert step == 7 and len(metrics) == 1 + len(flows)
    assert abs(metrics["val/flow_epe_px"] - sum(per_layer) / len(per_layer)) < 1e-5
    assert 0 < metrics["val/flow_epe_px"] == callback.last_epe_px
    pictures = sorted((tmp_path / "flows" / "step_000007").glob("*.png"))
    assert len(pictures) == len(flows)
    assert Image.open(pictures[0]).size == (8 * 48 + 9 * 2, 2 * 64 + 3 * 2)  # the ground-truth column too
    # no ground truth in the batch: pictures without its column, no EPE
    logger.metrics.clear()
    trainer.global_step = 8
    callback.on_validation_batch_end(trainer, module, None, {k: v for k, v in batch.items() if k != "flow"}, 0)
    assert logger.metrics == []
    assert Image.open(next((tmp_path / "flows" / "step_000008").glob("*.png"))).size[0] == 7 * 48 + 8 * 2
