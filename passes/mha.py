"""PrunedMultiheadAttention: nn.MultiheadAttention with fewer heads and its own widths.

nn.MultiheadAttention ties three sizes that pruning separates: the query's width, the
projected width (``num_heads * head_dim``) and, through ``embed_dim // num_heads``, the
width of a head. :func:`passes.shrink.shrink` replaces a pruned nn.MultiheadAttention by this
module: the same parameters (sliced), the same forward signature and the same arithmetic
(``torch.nn.functional.multi_head_attention_forward``'s), with the number of heads read from
the projections and ``head_dim`` (and so the attention's scale) kept from the original.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """An nn.MultiheadAttention whose heads and widths were pruned (see the module docstring).

    Attributes mirror nn.MultiheadAttention's: ``embed_dim`` is the query's width,
    ``kdim``/``vdim`` the key's and value's, ``num_heads`` the kept heads, ``head_dim`` the
    width of a query/key head (unchanged by pruning) and ``v_head_dim`` a value head's.

    Examples
    --------
    >>> mha = torch.nn.MultiheadAttention(8, 2).eval()
    >>> same = PrunedMultiheadAttention(mha).eval()
    >>> x = torch.randn(3, 1, 8)
    >>> torch.allclose(same(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
    """

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        packed = source.in_proj_weight is not None
        self.in_proj_weight = source.in_proj_weight
        self.q_proj_weight, self.k_proj_weight, self.v_proj_weight = (
            source.q_proj_weight, source.k_proj_weight, source.v_proj_weight)
        self.in_proj_bias, self.bias_k, self.bias_v = source.in_proj_bias, source.bias_k, source.bias_v
        self.out_proj = source.out_proj
        self.batch_first, self.dropout, self.add_zero_attn = source.batch_first, source.dropout, source.add_zero_attn
        self.head_dim = self.v_head_dim = source.head_dim  # pinned by the rule: the scale reads it
        self.embed_dim = (self.in_proj_weight if packed else self.q_proj_weight).shape[1]
        self.kdim = self.embed_dim if packed else self.k_proj_weight.shape[1]
        self.vdim = self.embed_dim if packed else self.v_proj_weight.shape[1]
        self._qkv_same_embed_dim = packed
        q_rows = self.in_proj_weight.shape[0] // 3 if packed else self.q_proj_weight.shape[0]
        self.num_heads = q_rows // self.head_dim

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qk = self.num_heads * self.head_dim
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.split([qk, qk, self.in_proj_weight.shape[0] - 2 * qk])
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split([qk, qk, self.in_proj_bias.shape[0] - 2 * qk])
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """nn.MultiheadAttention.forward, with the pruned sizes."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        attn_mask = _additive(attn_mask, query.dtype)
        key_padding_mask = _additive(key_padding_mask, query.dtype)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        length, batch, heads = query.shape[0], query.shape[1], self.num_heads
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None and self.bias_v is not None:
            k, v = torch.cat([k, self.bias_k.repeat(1, batch, 1)]), torch.cat([v, self.bias_v.repeat(1, batch, 1)])
            attn_mask, key_padding_mask = _pad(attn_mask), _pad(key_padding_mask)
        q = q.reshape(length, batch * heads, self.head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], batch * heads, self.head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], batch * heads, self.v_head_dim).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch * heads, 1, self.head_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(batch * heads, 1, self.v_head_dim)], dim=1)
            attn_mask, key_padding_mask = _pad(attn_mask), _pad(key_padding_mask)
        source = k.shape[1]
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, source).expand(-1, heads, -1, -1)
            padding = padding.reshape(batch * heads, 1, source)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.bmm(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
            weights = torch.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
            out = torch.bmm(F.dropout(weights, p=dropout) if dropout > 0 else weights, v)
            out = out.transpose(0, 1).reshape(length * batch, heads * self.v_head_dim)
            per_head = weights.view(batch, heads, length, source)
            returned: Tensor | None = per_head.mean(dim=1) if average_attn_weights else per_head
        else:
            if attn_mask is not None:
                one = attn_mask.shape[0] == 1
                attn_mask = attn_mask.unsqueeze(0) if one else attn_mask.view(batch, heads, -1, source)
            q, k, v = (t.view(batch, heads, t.shape[1], t.shape[2]) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout, scale=math.sqrt(1.0 / self.head_dim))
            out = out.permute(2, 0, 1, 3).reshape(length * batch, heads * self.v_head_dim)
            returned = None
        out = self.out_proj(out).view(length, batch, -1)
        if not batched:
            return out.squeeze(1), None if returned is None else returned.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), returned


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as an additive float mask; a float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _pad(mask: Tensor | None) -> Tensor | None:
    """One more key position, attended (bias_k/bias_v, add_zero_attn)."""
    return None if mask is None else F.pad(mask, (0, 1))
