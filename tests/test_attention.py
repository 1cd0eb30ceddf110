"""Concatenated self-attention processors: equality with the paper's literal concat-then-slice."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from leffa.architectures.dual_unet_attention import ConcatAttention, ReferenceRecorder
from leffa.attention import ReferenceBank, token_grid
from leffa.unets import build_unet


def small_layer(seed=0, dim=32, heads=4, qk_norm=None):
    torch.manual_seed(seed)
    attn = Attention(query_dim=dim, heads=heads, kv_heads=heads, dim_head=dim // heads, bias=False,
                     qk_norm=qk_norm)
    with torch.no_grad():  # norm weights away from their identity initialisation
        for p in [*attn.norm_q.parameters(), *attn.norm_k.parameters()] if qk_norm else []:
            p.add_(torch.randn_like(p) * 0.5)
    return attn


def test_generative_queries_only_equal_literal_concat_then_keep_first_half():
    attn = small_layer()
    bank = ReferenceBank(latent_hw=(4, 6))
    gen = torch.randn(2, 24, 32)
    ref = torch.randn(2, 24, 32)
    bank.features["layer"] = ref
    ours = ConcatAttention(bank, "layer", 32)(attn, gen)
    # the paper: F_cat = [F_gen ; F_ref] through the layer's self-attention, keep the first n outputs
    literal = AttnProcessor2_0()(attn, torch.cat([gen, ref], dim=1))[:, :24]
    torch.testing.assert_close(ours, literal, atol=1e-5, rtol=1e-5)


def test_registers_are_extra_key_value_tokens():
    attn = small_layer(1)
    bank = ReferenceBank(latent_hw=(3, 4))
    gen, ref = torch.randn(1, 12, 32), torch.randn(1, 12, 32)
    bank.features["layer"] = ref
    proc = ConcatAttention(bank, "layer", 32, num_registers=2)
    assert proc.registers.shape == (2, 32)
    ours = proc(attn, gen)
    literal = AttnProcessor2_0()(attn, torch.cat([gen, ref, proc.registers[None]], dim=1))[:, :12]
    torch.testing.assert_close(ours, literal, atol=1e-5, rtol=1e-5)


def test_recorder_records_input_and_runs_plain_self_attention():
    attn = small_layer(2)
    bank = ReferenceBank()
    x = torch.randn(2, 10, 32)
    out = ReferenceRecorder(bank, "layer")(attn, x)
    assert bank.features["layer"] is x
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, x), atol=1e-6, rtol=1e-6)


def literal_qk_norm_attention(attn, x, context):
    """Self-attention of ``x`` over ``context`` written out: the layer's norm over each head's
    query/key (``*_across_heads``: over all heads at once, before the split), then softmax(QK^T/sqrt(d))V."""
    b, heads = x.shape[0], attn.heads

    def heads_of(y, norm):
        if norm is not None and "across" in attn.qk_norm_name:
            y = norm(y)
        y = y.view(b, y.shape[1], heads, -1).transpose(1, 2)
        return norm(y) if norm is not None and "across" not in attn.qk_norm_name else y

    q, k = heads_of(attn.to_q(x), attn.norm_q), heads_of(attn.to_k(context), attn.norm_k)
    v = heads_of(attn.to_v(context), None)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, x.shape[1], -1)
    return attn.to_out[0](out), q, k


@pytest.mark.parametrize("qk_norm", ["layer_norm", "rms_norm", "l2", "layer_norm_across_heads",
                                     "rms_norm_across_heads"])
def test_query_key_norms_of_the_layer_are_applied(qk_norm):
    attn = small_layer(3, qk_norm=qk_norm)
    attn.qk_norm_name = qk_norm
    gen, ref = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    bank = ReferenceBank(latent_hw=(3, 4), image_hw=(24, 32), theta_resolution=0.0,
                         capture_rows=torch.tensor([1]))
    torch.testing.assert_close(ReferenceRecorder(bank, "layer")(attn, ref),
                               literal_qk_norm_attention(attn, ref, ref)[0], atol=1e-5, rtol=1e-5)
    ours = ConcatAttention(bank, "layer", 32)(attn, gen)
    literal, q, k = literal_qk_norm_attention(attn, gen, torch.cat([gen, ref], dim=1))
    torch.testing.assert_close(ours, literal, atol=1e-5, rtol=1e-5)
    # the Leffa loss sees the normalised queries and keys the layer attends with
    capture = bank.captures["layer"]
    torch.testing.assert_close(capture.query, q[[1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(capture.key, k[[1], :, 12:], atol=1e-5, rtol=1e-5)


def test_capture_hands_out_queries_and_reference_keys_of_selected_rows():
    attn = small_layer(3)
    bank = ReferenceBank(latent_hw=(4, 6), image_hw=(32, 48), theta_resolution=1 / 32)
    gen, ref = torch.randn(3, 24, 32), torch.randn(3, 24, 32)
    bank.features["layer"] = ref
    bank.capture_rows = torch.tensor([0, 2])
    ConcatAttention(bank, "layer", 32)(attn, gen)
    cap = bank.captures["layer"]
    assert cap.grid == (4, 6)
    q = attn.to_q(gen[[0, 2]]).view(2, 24, 4, 8).transpose(1, 2)
    k = attn.to_k(ref[[0, 2]]).view(2, 24, 4, 8).transpose(1, 2)
    torch.testing.assert_close(cap.query, q)
    torch.testing.assert_close(cap.key, k)
    # a layer at or below theta_resolution is not captured: 4/32 = 1/8, so theta 1/8 excludes it
    bank.captures.clear()
    bank.theta_resolution = 1 / 8
    ConcatAttention(bank, "layer", 32)(attn, gen)
    assert not bank.captures


def test_missing_reference_is_a_clear_error():
    with pytest.raises(RuntimeError, match="Reference UNet first"):
        ConcatAttention(ReferenceBank(latent_hw=(2, 2)), "x", 32)(small_layer(), torch.randn(1, 4, 32))


@pytest.mark.parametrize("latent,n,expected", [((128, 96), 12288, (128, 96)), ((128, 96), 768, (32, 24)),
                                                ((32, 22), 48, (8, 6)), ((32, 22), 12, (4, 3))])
def test_token_grid_follows_the_unet_downsampling(latent, n, expected):
    assert token_grid(n, latent) == expected


def test_token_grid_rejects_impossible_counts():
    with pytest.raises(ValueError):
        token_grid(50, (16, 12))


def test_cross_attention_removed_or_passed_through_and_conv_in_widened_with_zeros(tiny_configs):
    base = build_unet(None, tiny_configs["unet_config"], 4, cross_attention="removed")
    wide = build_unet(None, tiny_configs["unet_config"], 12, cross_attention="removed")
    for unet in (base, wide):
        names = [n for n, _ in unet.named_modules()]
        assert not any(n.endswith((".attn2", ".norm2")) and "transformer_blocks" in n for n in names)
        assert not any("attn2" in k for k in unet.state_dict())
        assert any(n.endswith("attn1") for n in names)
    # passthrough: norm2 kept (and its weights), attn2 a module without parameters
    kept = build_unet(None, tiny_configs["unet_config"], 4)
    keys = kept.state_dict().keys()
    assert not any("attn2" in k for k in keys) and any("transformer_blocks" in k and ".norm2." in k for k in keys)
    assert len(keys) - len(base.state_dict()) == 2 * sum(1 for n in keys if n.endswith(".norm2.weight")
                                                         and "transformer_blocks" in n)
    # widening keeps the old channels and zero-initialises the new ones
    torch.manual_seed(0)
    from leffa.unets import set_input_channels
    old = base.conv_in.weight.detach().clone()
    set_input_channels(base, 12)
    assert base.conv_in.weight.shape[1] == 12 and base.config.in_channels == 12
    torch.testing.assert_close(base.conv_in.weight[:, :4], old)
    assert base.conv_in.weight[:, 4:].abs().sum() == 0
    # so the widened UNet computes the same function of the first 4 channels
    x = torch.randn(1, 12, 8, 8)
    ref_unet = build_unet(None, tiny_configs["unet_config"], 4, cross_attention="removed")
    ref_unet.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("conv_in")}, strict=False)
    ref_unet.conv_in.load_state_dict({"weight": old, "bias": base.conv_in.bias})
    with torch.no_grad():
        a = base(x, 10, encoder_hidden_states=None).sample
        b = ref_unet(x[:, :4], 10, encoder_hidden_states=None).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
