"""attention_flow and warp_loss (Eq. 2-4) against straightforward computations written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from leffa.losses import attention_flow, coordinate_map, diffusion_loss, warp_loss


def naive_flow(q, k, ref_size, tau, average_heads, register_key=None):
    """The paper literally: explicit softmax matrix, mean over heads, times the coordinate map."""
    h, w = ref_size
    d = q.shape[-1]
    coords = []
    for i in range(h):
        for j in range(w):
            coords.append([-1 + 2 * j / (w - 1), -1 + 2 * i / (h - 1)])
    coords = torch.tensor(coords, dtype=q.dtype)  # (h*w, 2), (x, y)
    if register_key is not None:
        k = torch.cat([k, register_key], dim=2)
        coords = torch.cat([coords, torch.zeros(register_key.shape[2], 2, dtype=q.dtype)])
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) / tau  # (B, heads, n_q, n_k)
    attn = torch.softmax(logits, dim=-1)
    if average_heads:
        return attn.mean(1) @ coords  # (B, n_q, 2)
    return attn @ coords


def test_coordinate_map_corners_and_order():
    c = coordinate_map(3, 4)
    assert c.shape == (12, 2)
    assert c[0].tolist() == [-1.0, -1.0] and c[-1].tolist() == [1.0, 1.0]
    # row-major: second token moves along x, token w starts the second row
    assert c[1, 0] > c[0, 0] and c[1, 1] == c[0, 1]
    assert c[4].tolist() == [-1.0, 0.0]


@pytest.mark.parametrize("average_heads", [True, False])
@pytest.mark.parametrize("registers", [0, 3])
def test_attention_flow_matches_naive_forward_and_gradient(average_heads, registers):
    g = torch.Generator().manual_seed(0)
    b, heads, n_q, d, (h, w) = 2, 4, 20, 8, (5, 6)
    q = torch.randn(b, heads, n_q, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, heads, h * w, d, generator=g, dtype=torch.float64, requires_grad=True)
    reg = torch.randn(b, heads, registers, d, generator=g, dtype=torch.float64) if registers else None
    fused = attention_flow(q, k, (h, w), temperature=2.0, average_heads=average_heads, register_key=reg)
    naive = naive_flow(q, k, (h, w), 2.0, average_heads, reg)
    assert fused.shape == ((b, n_q, 2) if average_heads else (b, heads, n_q, 2))
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=0)
    weights = torch.randn(fused.shape, generator=g, dtype=torch.float64)
    gq_f, gk_f = torch.autograd.grad((fused * weights).sum(), (q, k))
    gq_n, gk_n = torch.autograd.grad((naive * weights).sum(), (q, k))
    torch.testing.assert_close(gq_f, gq_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(gk_f, gk_n, atol=1e-5, rtol=0)


def test_attention_flow_padded_values_equal_unpadded():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 10, 16, generator=g), torch.randn(1, 2, 12, 16, generator=g)
    torch.testing.assert_close(attention_flow(q, k, (3, 4), pad_values=True),
                               attention_flow(q, k, (3, 4), pad_values=False), atol=1e-6, rtol=0)


def test_attention_flow_sharp_attention_points_at_the_attended_token():
    # a query equal to a (large) key attends to that token: its flow is the token's coordinate
    h, w, d = 4, 5, 8
    k = torch.randn(1, 1, h * w, d, generator=torch.Generator().manual_seed(2)) * 50
    q = k[:, :, 7:8]  # token (1, 2)
    flow = attention_flow(q, k, (h, w), temperature=1.0)
    torch.testing.assert_close(flow[0, 0], torch.tensor([0.0, -1 + 2 / 3]), atol=1e-4, rtol=0)


def test_attention_flow_rejects_wrong_grid():
    with pytest.raises(ValueError, match="ref_size"):
        attention_flow(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), (2, 4))


def naive_warp_loss(flow, ref, tgt, mask, upsample):
    b, h, w, _ = flow.shape
    H, W = tgt.shape[-2:]
    losses = []
    for i in range(b):
        if upsample:
            grid = F.interpolate(flow[i:i + 1].permute(0, 3, 1, 2), size=(H, W), mode="bilinear",
                                 align_corners=True).permute(0, 2, 3, 1)
            r, t, m = ref[i:i + 1], tgt[i:i + 1], mask[i:i + 1]
        else:
            grid = flow[i:i + 1]
            r = F.interpolate(ref[i:i + 1], size=(h, w), mode="area")
            t = F.interpolate(tgt[i:i + 1], size=(h, w), mode="area")
            m = F.interpolate(mask[i:i + 1], size=(h, w), mode="nearest")
        warped = F.grid_sample(r, grid, mode="bilinear", align_corners=True)
        diff = (t * m - warped * m) ** 2
        losses.append(diff.sum() / (3 * diff.shape[-1] * diff.shape[-2]))
    return torch.stack(losses)


@pytest.mark.parametrize("upsample", [True, False])
def test_warp_loss_matches_naive_forward_and_gradient(upsample):
    g = torch.Generator().manual_seed(3)
    b, h, w, H, W = 3, 4, 3, 32, 24
    flow = (torch.rand(b, h, w, 2, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    ref = torch.rand(b, 3, H, W, generator=g, dtype=torch.float64) * 2 - 1
    tgt = torch.rand(b, 3, H, W, generator=g, dtype=torch.float64) * 2 - 1
    mask = (torch.rand(b, 1, H, W, generator=g) > 0.5).double()
    fused = warp_loss(flow, ref, tgt, mask, upsample=upsample)
    naive = naive_warp_loss(flow, ref, tgt, mask, upsample)
    assert fused.shape == (b,)
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=0)
    g_f, = torch.autograd.grad(fused.sum(), flow)
    g_n, = torch.autograd.grad(naive.sum(), flow)
    torch.testing.assert_close(g_f, g_n, atol=1e-5, rtol=0)


def test_warp_loss_is_zero_for_the_identity_flow_and_outside_the_mask():
    H, W = 16, 12
    image = torch.rand(1, 3, H, W) * 2 - 1
    identity = coordinate_map(H, W).view(1, H, W, 2)
    mask = torch.ones(1, 1, H, W)
    assert warp_loss(identity, image, image, mask).item() < 1e-10
    # a different target counts only inside the mask
    other = image.clone()
    other[..., :, : W // 2] = 5.0
    half = torch.zeros(1, 1, H, W)
    half[..., W // 2:] = 1
    assert warp_loss(identity, image, other, half).item() < 1e-10
    assert warp_loss(identity, image, other, mask).item() > 1.0


def test_diffusion_loss_is_per_sample_mse():
    a, b = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(diffusion_loss(a, b), torch.stack([((a[i] - b[i]) ** 2).mean() for i in range(3)]))
