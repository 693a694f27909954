"""nn.MultiheadAttention with fewer heads: the module torch cannot express, rebuilt.

``nn.MultiheadAttention`` ties its inner width to its embedding (``head_dim = embed_dim // num_heads``), so
removing a head cannot be written as a smaller ``nn.MultiheadAttention``. :class:`SlimMultiheadAttention`
keeps the same call signature and the same packed ``in_proj_weight`` / ``out_proj`` layout, with an inner
width of ``kept_heads × head_dim``. :func:`rebuild_mha` slices the rows of the kept heads out of the packed
q/k/v projections and their columns out of the output projection. With every head kept it builds a plain
``nn.MultiheadAttention`` again, whose weights are those of the original bit for bit.

The output of ``merge`` (an identity) is the concatenated heads' context, so importance scores can hook
there, as they hook a ``transformers`` self-attention module's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from slipstream.errors import ConfigError


class SlimMultiheadAttention(nn.Module):
    """Self- or cross-attention with ``num_heads`` heads of ``head_dim`` each, over ``embed_dim`` features."""

    # TransformerEncoderLayer's fused fast path reads nn.MultiheadAttention's private layout; this module has
    # another, so the flag that path checks is off and the layer takes its ordinary (exportable) path.
    _qkv_same_embed_dim = False

    def __init__(
        self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, batch_first: bool = False
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim, self.batch_first = embed_dim, num_heads, head_dim, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.merge = nn.Identity()
        # The original module's heads these are (a per-head 3-D attn_mask is written for those).
        self.source_heads: tuple[int, ...] = tuple(range(num_heads))
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt, _ = query.shape
        src = key.shape[1]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).view(batch, tgt, self.num_heads, self.head_dim).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(batch, src, self.num_heads, self.head_dim).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(batch, src, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim**-0.5
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            bias = _bias(attn_mask, scores.dtype)
            if bias.dim() == 3:  # (batch × original heads, tgt, src): keep the rows of the kept heads
                bias = bias.view(batch, -1, tgt, src)[:, list(self.source_heads)]
            scores = scores + bias
        if key_padding_mask is not None:
            scores = scores + _bias(key_padding_mask, scores.dtype).view(batch, 1, 1, src)
        weights = torch.softmax(scores, dim=-1)
        context = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tgt, self.num_heads * self.head_dim)
        out = self.out_proj(self.merge(context))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: masked) or a float one, as an additive bias."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def head_layout(mha: Any) -> tuple[int, int]:
    """(heads, head_dim) of an nn.MultiheadAttention or a SlimMultiheadAttention."""
    return int(mha.num_heads), int(mha.head_dim)


def _check_rebuildable(mha: Any) -> None:
    if isinstance(mha, SlimMultiheadAttention):
        return
    if not getattr(mha, "_qkv_same_embed_dim", True) or getattr(mha, "bias_k", None) is not None:
        raise ConfigError(
            "prune.structured removes heads of self-attention with one packed q/k/v projection; this "
            "nn.MultiheadAttention has separate kdim/vdim projections or add_bias_kv.",
            field="heads",
            hint="Set heads: 0 to keep its heads, or list the module in ignore.",
        )


def rebuild_mha(mha: Any, keep: Sequence[int]) -> nn.Module:
    """A new attention module with only the heads in ``keep`` (indices into ``mha``'s heads, any order)."""
    _check_rebuildable(mha)
    heads, head_dim = head_layout(mha)
    kept = sorted({int(h) for h in keep})
    if not kept or kept[0] < 0 or kept[-1] >= heads:
        raise ConfigError(
            f"Heads to keep must be 1 to {heads} distinct indices in [0, {heads}); got {list(keep)}.",
            field="heads",
        )
    inner = heads * head_dim
    cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
    rows = torch.cat([cols + part * inner for part in range(3)])
    bias = mha.in_proj_bias is not None
    out: nn.MultiheadAttention | SlimMultiheadAttention
    if len(kept) == heads and not isinstance(mha, SlimMultiheadAttention):
        out = nn.MultiheadAttention(mha.embed_dim, heads, bias=bias, batch_first=mha.batch_first)
    else:
        out = SlimMultiheadAttention(mha.embed_dim, len(kept), head_dim, bias=bias, batch_first=mha.batch_first)
        sources = getattr(mha, "source_heads", tuple(range(heads)))
        out.source_heads = tuple(sources[h] for h in kept)
    with torch.no_grad():
        out.in_proj_weight.copy_(mha.in_proj_weight[rows])
        out.out_proj.weight.copy_(mha.out_proj.weight[:, cols])
        if bias and out.in_proj_bias is not None:
            out.in_proj_bias.copy_(mha.in_proj_bias[rows])
            out.out_proj.bias.copy_(mha.out_proj.bias)
    out.train(mha.training)
    return out


def slim_all_heads(mha: Any) -> SlimMultiheadAttention:
    """``mha`` as a SlimMultiheadAttention with every head: same weights, a ``merge`` point to hook."""
    if isinstance(mha, SlimMultiheadAttention):
        return mha
    _check_rebuildable(mha)
    heads, head_dim = head_layout(mha)
    slim = SlimMultiheadAttention(
        mha.embed_dim, heads, head_dim, bias=mha.in_proj_bias is not None, batch_first=mha.batch_first
    )
    slim.load_state_dict({k: v for k, v in mha.state_dict().items() if k in slim.state_dict()})
    slim.train(mha.training)
    return slim
