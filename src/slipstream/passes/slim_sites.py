"""Where an attention model can be slimmed: its attention heads and its feed-forward neurons.

A *site* is one prunable group of units with three things: a module whose output is the units' activations
(the concatenated heads' context, or the feed-forward hidden layer after its activation), the linear layer
that reads those activations (so an output norm can be taken), and a ``prune(keep)`` that rebuilds the
layers with only the kept units.

Two families are found:

- ``transformers`` encoders in the BERT family (BERT, RoBERTa, ELECTRA, MiniLM...): a layer with
  ``attention.self`` (query/key/value), ``attention.output.dense``, ``intermediate.dense`` and
  ``output.dense``. Heads are removed by slicing the q/k/v rows and the output projection's columns (as
  ``transformers``' ``prune_linear_layer`` does; transformers 5 dropped ``prune_heads`` from its models),
  feed-forward neurons by slicing ``intermediate.dense``'s rows and ``output.dense``'s columns.
- ``nn.MultiheadAttention`` anywhere: rebuilt with fewer heads (:mod:`slipstream.passes.slim_mha`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slipstream.passes.slim_mha import SlimMultiheadAttention, rebuild_mha, slim_all_heads

SiteKind = Literal["heads", "ffn"]


@dataclass
class Site:
    """One group of prunable units: ``units`` heads (each ``unit_width`` wide) or neurons (width 1)."""

    name: str
    kind: SiteKind
    units: int
    unit_width: int
    activations: nn.Module  # its output (or output[0]) holds the units' activations on the last axis
    reader: nn.Linear  # reads those activations (columns = units × unit_width)
    prune: Callable[[Sequence[int]], None]  # keep these unit indices


def _linear_rows(layer: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(layer.in_features, len(index), bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[index])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[index])
    return new.train(layer.training)


def _linear_cols(layer: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(index), layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, index])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new.train(layer.training)


def _unit_index(keep: Sequence[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in sorted(keep)])


def is_bert_layer(module: nn.Module) -> bool:
    """A BERT-family encoder layer: attention.self (q/k/v), attention.output.dense, intermediate, output."""
    att = getattr(module, "attention", None)
    selfatt = getattr(att, "self", None)
    return (
        all(isinstance(getattr(selfatt, n, None), nn.Linear) for n in ("query", "key", "value"))
        and hasattr(selfatt, "attention_head_size")
        and isinstance(getattr(getattr(att, "output", None), "dense", None), nn.Linear)
        and isinstance(getattr(getattr(module, "intermediate", None), "dense", None), nn.Linear)
        and isinstance(getattr(getattr(module, "output", None), "dense", None), nn.Linear)
    )


def _bert_sites(name: str, layer: Any) -> list[Site]:
    selfatt, out = layer.attention.self, layer.attention.output
    head_dim = int(selfatt.attention_head_size)

    def prune_heads(keep: Sequence[int]) -> None:
        index = _unit_index(keep, head_dim)
        for proj in ("query", "key", "value"):
            setattr(selfatt, proj, _linear_rows(getattr(selfatt, proj), index))
        out.dense = _linear_cols(out.dense, index)
        selfatt.num_attention_heads = len(keep)
        selfatt.all_head_size = len(keep) * head_dim

    def prune_ffn(keep: Sequence[int]) -> None:
        index = torch.tensor(sorted(keep), dtype=torch.long)
        layer.intermediate.dense = _linear_rows(layer.intermediate.dense, index)
        layer.output.dense = _linear_cols(layer.output.dense, index)

    heads = selfatt.query.out_features // head_dim
    return [
        Site(f"{name}.attention", "heads", heads, head_dim, selfatt, out.dense, prune_heads),
        Site(f"{name}.intermediate", "ffn", layer.intermediate.dense.out_features, 1, layer.intermediate,
             layer.output.dense, prune_ffn),
    ]  # fmt: skip


def _mha_site(name: str, parent: nn.Module, attr: str) -> Site:
    """An nn.MultiheadAttention as a site: turned into a SlimMultiheadAttention (same weights) to be hooked."""
    slim = slim_all_heads(getattr(parent, attr))
    setattr(parent, attr, slim)

    def prune(keep: Sequence[int]) -> None:
        setattr(parent, attr, rebuild_mha(getattr(parent, attr), keep))

    return Site(name, "heads", slim.num_heads, slim.head_dim, slim.merge, slim.out_proj, prune)


def find_sites(module: nn.Module, ignore: Sequence[str] = ()) -> list[Site]:
    """Every site of ``module`` outside the modules named in ``ignore``, in definition order.

    nn.MultiheadAttention modules are swapped for SlimMultiheadAttention with all heads (so their heads can
    be hooked and scored); call this on a copy.
    """
    skipped = tuple(ignore)
    sites: list[Site] = []
    for name, sub in list(module.named_modules()):
        if any(name == s or name.startswith(f"{s}.") for s in skipped):
            continue
        if is_bert_layer(sub):
            sites.extend(_bert_sites(name, sub))
        for attr, child in list(sub.named_children()):
            if isinstance(child, nn.MultiheadAttention | SlimMultiheadAttention):
                full = f"{name}.{attr}" if name else attr
                if not any(full == s or full.startswith(f"{s}.") for s in skipped):
                    sites.append(_mha_site(full, sub, attr))
    return sites


def has_attention(module: nn.Module) -> bool:
    """Whether ``module`` has attention this pass slims (a BERT-family layer or an nn.MultiheadAttention)."""
    return any(
        is_bert_layer(m) or isinstance(m, nn.MultiheadAttention | SlimMultiheadAttention) for m in module.modules()
    )
