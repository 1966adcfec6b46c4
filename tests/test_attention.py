"""nn.MultiheadAttention with called projections (irconvert.attention): the same outputs and state_dict
keys as torch's, binary projections in torchvision's ViT, exact packed reload and runtime."""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import irconvert
from irconvert.attention import ProjectedAttention, prepare_attention
from irconvert.verify import max_abs_diff


@pytest.mark.parametrize("batch_first", [True, False])
def test_projected_attention_computes_what_torch_does_with_the_same_keys(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    ours = nn.Sequential(copy.deepcopy(mha))
    assert prepare_attention(ours) == ["0"] and isinstance(ours[0], ProjectedAttention)
    assert sorted(ours[0].state_dict()) == sorted(mha.state_dict())
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kv = torch.randn_like(x)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    for args, kw in [((x, x, x), {}), ((x, kv, kv), {}), ((x, x, x), {"key_padding_mask": pad}),
                     ((x, x, x), {"attn_mask": causal, "need_weights": False})]:
        want, got = mha(*args, **kw), ours[0](*args, **kw)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
    mha.load_state_dict(ours[0].state_dict())  # and back: the keys are torch's


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def test_torchvision_vit_attention_is_binary_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = irconvert.binarize(_vit(), calibrate=x, w1a1_min_fan_in=0)  # a tiny ViT: W1A1 however narrow
    modes = {n: p.mode for n, p in net.irconvert_plan.layers.items()}
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert modes[f"{attn}.in_proj"] == modes[f"{attn}.out_proj"] == "W1A1"
    nn.init.normal_(net.heads.head.weight)  # torchvision's zero head would stop every gradient
    net.train()
    net(x).pow(2).sum().backward()
    assert net.get_submodule(f"{attn}.in_proj").latent_weight.grad.abs().sum() > 0
    packed = irconvert.save_packed(net, tmp_path / "packed.safetensors")
    loaded = irconvert.load_packed(packed, model=_vit())
    assert max_abs_diff(net, loaded, x) == 0
    fast = irconvert.runtime.load(packed, model=_vit())
    assert fast.irconvert_runtime[f"{attn}.in_proj"] == fast.irconvert_runtime[f"{attn}.out_proj"] == "bitwise"
    assert max_abs_diff(loaded, fast, x) <= 1e-5
    latent = irconvert.load(irconvert.save_latent(net, tmp_path / "model.safetensors"), model=_vit())
    assert max_abs_diff(net, latent, x) == 0
