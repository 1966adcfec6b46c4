"""nn.MultiheadAttention with its projections as layers, so that they can be binarized like timm's.

nn.MultiheadAttention keeps the input projection as a raw parameter (`in_proj_weight`, 3E x E) and
reads `out_proj.weight` inside F.multi_head_attention_forward, so neither is a layer whose forward
sees its input, and neither can binarize it. `prepare_attention` turns each such module, in place,
into `ProjectedAttention`, which computes the same attention (Vaswani et al., 2017):

    [q, k, v] = x W_in^T + b_in,   head_i = softmax(q_i k_i^T / sqrt(d) + mask) v_i,
    y = [head_1 ... head_h] W_out^T + b_out

with W_in held by an nn.Linear child `in_proj` and `out_proj` called as a module, so both become
ordinary conv/linear layers to the analysis, the plan, binarization, packing and the runtime. The
state_dict keys stay those of nn.MultiheadAttention (`in_proj_weight`, `in_proj_bias`,
`out_proj.weight`, `out_proj.bias`): pretrained weights and files written before load unchanged.

Only the common form is taken over: q, k, v of one embedding size, no bias_k / bias_v, no
add_zero_attn, batched inputs. Other modules stay as they are.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_KEYS = (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias"))


def _fits(m: nn.Module) -> bool:
    return (type(m) is nn.MultiheadAttention and m._qkv_same_embed_dim and m.bias_k is None
            and not m.add_zero_attn and m.in_proj_weight is not None)


def prepare_attention(model: nn.Module) -> list[str]:
    """Turn every plain nn.MultiheadAttention of `model` into ProjectedAttention in place; return their names."""
    done = []
    for name, m in [(n, m) for n, m in model.named_modules() if _fits(m)]:
        w = m._parameters.pop("in_proj_weight")
        b = m._parameters.pop("in_proj_bias", None)
        proj = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        proj.weight = w
        if b is not None:
            proj.bias = b
        m.__class__ = ProjectedAttention
        if type(m.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear:
            m.out_proj.__class__ = nn.Linear  # the same layer (a marker subclass for torch.ao), plain for the runtime
        m.in_proj = proj
        m._register_state_dict_hook(_keys_out)
        m._register_load_state_dict_pre_hook(_keys_in)
        done.append(name)
    return done


def _keys_out(module, state, prefix, local_metadata) -> None:
    for outer, inner in _KEYS:
        if prefix + inner in state:
            state[prefix + outer] = state.pop(prefix + inner)


def _keys_in(state, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for outer, inner in _KEYS:
        if prefix + outer in state:
            state[prefix + inner] = state.pop(prefix + outer)


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = may not attend) as -inf additions; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class ProjectedAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose input and output projections are called layers (see module docstring)."""

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Optional[torch.Tensor]:
        return self.in_proj.bias

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        e, h = self.embed_dim, self.num_heads
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:  # each input through the same binary layer; the third of the rows it needs
            q, k, v = (self.in_proj(t)[..., i * e:(i + 1) * e] for i, t in enumerate((query, key, value)))
        b, n, s = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(b, -1, h, e // h).transpose(1, 2) for t in (q, k, v))
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(b, h, n, s)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype).reshape(b, 1, 1, s)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            attn = (q @ k.transpose(-2, -1) / math.sqrt(e // h))
            if mask is not None:
                attn = attn + mask
            attn = attn.softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            out = F.dropout(attn, p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        return (out if self.batch_first else out.transpose(0, 1)), weights
