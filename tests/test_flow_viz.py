"""Attention-flow pictures."""

import torch

from leffa.testing import make_batch
from leffa.flow_viz import flow_figure, flow_to_rgb, layer_flows, query_attention, warp
from leffa.losses import coordinate_map
from leffa.module import LeffaModule


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
