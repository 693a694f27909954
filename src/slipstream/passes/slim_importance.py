"""How much each attention head and feed-forward neuron matters, and which ones to keep.

Scores, one per unit of a :class:`~slipstream.passes.slim_sites.Site`:

- ``l1`` / ``l2``: the norm of the weights that read the unit (the output projection's columns).
- ``output_norm``: the mean L2 norm of the unit's contribution to what its reader computes, on data
  (a head's context through its slice of the output projection; a neuron's activation times its column).
- ``taylor``: the first-order estimate of how much removing the unit changes the model's output, on data.
  Each unit's activations are multiplied by a gate g = 1; ∂L/∂g = Σ activation × ∂L/∂activation is the
  Taylor term. The distillation loss itself has zero gradient before pruning (student = teacher), so L is a
  random projection of the output, L = ⟨r, f(x)⟩ with r ~ N(0, I): the expected square of its gate gradient
  equals the squared first-order change of the output, which is the first-order distillation (MSE) loss of
  removing the unit. Scores are averaged over batches.
- ``random``: a seeded baseline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from slipstream.passes.slim_sites import Site

Importance = Literal["l1", "l2", "random", "taylor", "output_norm"]
DATA_IMPORTANCE: tuple[Importance, ...] = ("taylor", "output_norm")
Batch = tuple[torch.Tensor, ...]


def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``logits`` / ``last_hidden_state``, or the first one."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "sentence_embedding", "last_hidden_state"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]  # type: ignore[no-any-return]
        out = tuple(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model output {type(out).__name__} holds no tensor")  # a bug: callers pass models


def _units_view(t: torch.Tensor, site: Site) -> torch.Tensor:
    return t.reshape(-1, site.units, site.unit_width)


def weight_scores(site: Site, p: int) -> torch.Tensor:
    w = site.reader.weight.detach().reshape(site.reader.out_features, site.units, site.unit_width)
    return w.abs().pow(p).sum(dim=(0, 2)).pow(1 / p)


def _contribution_norm(t: torch.Tensor, site: Site) -> torch.Tensor:
    """Mean over rows of ‖unit's activations × its reader columns‖ for every unit: shape [units]."""
    act = _units_view(t.detach(), site)
    w = site.reader.weight.detach().reshape(site.reader.out_features, site.units, site.unit_width)
    norms: torch.Tensor
    if site.unit_width == 1:
        norms = act[..., 0].abs().mean(dim=0) * w[..., 0].norm(dim=0)
    else:
        norms = torch.einsum("nuw,ouw->nuo", act, w).norm(dim=-1).mean(dim=0)
    return norms


def activation_scores(
    module: nn.Module, sites: Sequence[Site], batches: Iterable[Batch], kind: Importance, seed: int
) -> list[torch.Tensor]:
    """``taylor`` or ``output_norm`` scores of every site, accumulated over ``batches`` (module in eval mode)."""
    gates = [torch.ones(s.units, requires_grad=True) for s in sites]
    totals = [torch.zeros(s.units, dtype=torch.float64) for s in sites]
    generator = torch.Generator().manual_seed(seed)

    def hook_for(i: int) -> Any:
        site = sites[i]

        def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
            t = out[0] if isinstance(out, tuple) else out
            if kind == "output_norm":
                totals[i] += _contribution_norm(t, site).double()
                return None
            gated = t * gates[i].repeat_interleave(site.unit_width)
            return (gated, *out[1:]) if isinstance(out, tuple) else gated

        return hook

    handles = [s.activations.register_forward_hook(hook_for(i)) for i, s in enumerate(sites)]
    was_training = module.training
    module.eval()
    batches_seen = 0
    try:
        for batch in batches:
            batches_seen += 1
            if kind == "output_norm":
                with torch.no_grad():
                    module(*batch)
                continue
            with torch.enable_grad():
                out = main_output(module(*batch))
                r = torch.randn(out.shape, generator=generator, dtype=out.dtype)
                grads = torch.autograd.grad((out * r).sum(), gates)
            for total, g in zip(totals, grads, strict=True):
                total += g.detach().double() ** 2
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return [(t / max(batches_seen, 1)).float() for t in totals]


def scores(
    module: nn.Module, sites: Sequence[Site], kind: Importance, batches: Iterable[Batch] | None, seed: int
) -> list[torch.Tensor]:
    """One score per unit of every site; higher means keep. ``batches`` is needed by the data importances."""
    if not sites:
        return []
    if kind in DATA_IMPORTANCE:
        if batches is None:
            raise ValueError(f"{kind} importance needs batches")  # callers check and raise ConfigError first
        return activation_scores(module, sites, batches, kind, seed)
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        return [torch.rand(s.units, generator=generator) for s in sites]
    return [weight_scores(s, 1 if kind == "l1" else 2) for s in sites]


def _kept_count(units: int, remove: int, round_to: int | None) -> int:
    keep = max(units - remove, 1)
    if round_to is not None and round_to > 1:
        keep = min(units, -(-keep // round_to) * round_to)
    return keep


def choose_keep(
    site_scores: Sequence[torch.Tensor], amounts: Sequence[float], *, scope: Literal["layer", "global"],
    round_to: Sequence[int | None], kinds: Sequence[str],
) -> list[list[int]]:  # fmt: skip
    """The unit indices each site keeps: the highest scores, removing ``amounts[i]`` of site i's units.

    ``global`` ranks the units of sites of one kind (heads, or neurons) together, each site's scores divided
    by their sum so that layers of different scale compare; every site keeps at least one unit.
    """
    keeps: list[list[int] | None] = [None] * len(site_scores)
    if scope == "global":
        for kind, amount in sorted(set(zip(kinds, amounts, strict=True))):
            members = [i for i, (k, a) in enumerate(zip(kinds, amounts, strict=True)) if (k, a) == (kind, amount)]
            pooled = [(float(v) / max(float(site_scores[i].sum()), 1e-30), i, u)
                      for i in members for u, v in enumerate(site_scores[i].tolist())]  # fmt: skip
            remove_total = int(amount * len(pooled))
            removed: dict[int, int] = dict.fromkeys(members, 0)
            for _, i, _u in sorted(pooled)[:remove_total]:
                removed[i] += 1
            for i in members:
                keeps[i] = _top(site_scores[i], _kept_count(len(site_scores[i]), removed[i], round_to[i]))
    for i, s in enumerate(site_scores):
        if keeps[i] is None:
            keeps[i] = _top(s, _kept_count(len(s), int(amounts[i] * len(s)), round_to[i]))
    return [k for k in keeps if k is not None]


def _top(score: torch.Tensor, count: int) -> list[int]:
    # A stable order: ties keep the lower index, so results do not depend on the sort's implementation.
    order = sorted(range(len(score)), key=lambda u: (-float(score[u]), u))
    return sorted(order[:count])
