"""Fuse multi-head self-attention into onnxruntime's com.microsoft ``Attention`` op.

onnxruntime.transformers' own fusion does not match the graphs torch dynamo exports from transformers 5
(scaled-dot-product attention decomposed with a sqrt-scale on both Q and K, a K transpose spelled as
Reshape→Transpose→Reshape, and an IsNaN/Where guard after the Softmax): it fuses LayerNorm and BiasGelu, no
Attention (shared/FACTS.md). This module matches that decomposition (and the classic TorchScript one) per
Softmax, and replaces each match with one ``Attention`` node: packed Q/K/V weights, the mask as onnxruntime's
2-D ``mask_index``. Dynamic int8 then turns it into ``QAttention``, one integer GEMM for Q, K and V.

The mask is the one thing a pattern cannot prove: the 4-D additive bias the export computes from the
attention mask could be causal, or shaped otherwise. So it is checked by running the model on a probe mask
(two sequences, one padded) and comparing the bias with what a padding mask gives; anything else is left
unfused, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
# The probe: batch 2, 5 tokens, the first sequence padded after 3 tokens.
PROBE_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
# A masked position must push its score below this for the 2-D mask to be equivalent.
MASKED_AT_MOST = -1e4


@dataclass(frozen=True)
class Match:
    """One self-attention block: its input, projections, scale, mask bias, and the tensor it produces."""

    x: str
    weights: tuple[str, str, str]  # Q, K, V (hidden × hidden) initializers
    biases: tuple[str, str, str]
    heads: int
    scale: float
    mask_bias: str | None  # the additive 4-D mask tensor added before the Softmax, if any
    output: str


@dataclass
class Graph:
    """Lookups over one graph: who produces and who consumes each tensor, and its constants."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for init in self.model.graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        for node in self.model.graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def op(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def scalar(self, name: str) -> float | None:
        value = self.consts.get(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None


def _perm(node: onnx.NodeProto | None) -> list[int] | None:
    if node is None:
        return None
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _scaled(g: Graph, name: str) -> tuple[str, float]:
    """The tensor under an optional Mul/Div by a scalar constant, and that factor."""
    for op in ("Mul", "Div"):
        node = g.op(name, op)
        if node is None:
            continue
        for i, j in ((0, 1), (1, 0)) if op == "Mul" else ((0, 1),):
            c = g.scalar(node.input[j])
            if c is not None and c != 0.0:
                return node.input[i], (c if op == "Mul" else 1.0 / c)
    return name, 1.0


def _projection(g: Graph, name: str, *, heads_first: bool = True) -> tuple[str, str, str, tuple[int, int]] | None:
    """X, W, B and (heads, head size) of ``Transpose(0,2,1,3)(Reshape(X @ W + B))`` (of the bare Reshape when
    not ``heads_first``); -1 where the reshape infers it."""
    if heads_first:
        tr = g.op(name, "Transpose")
        if tr is None or _perm(tr) != [0, 2, 1, 3]:
            return None
        name = tr.input[0]
    reshape = g.op(name, "Reshape")
    if reshape is None:
        return None
    shape = _shape_tail(g, reshape.input[1])
    add = g.op(reshape.input[0], "Add")
    if add is None or shape is None:
        return None
    for lin, bias in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        mm = g.op(lin, "MatMul")
        if mm is not None and mm.input[1] in g.consts and bias in g.consts:
            return str(mm.input[0]), str(mm.input[1]), str(bias), shape
    return None


def _shape_tail(g: Graph, name: str) -> tuple[int, int] | None:
    """The last two entries of a 4-D Reshape target (constant, or a Concat ending in two constants)."""
    if name in g.consts and g.consts[name].size == 4:
        v = g.consts[name].ravel()
        return int(v[2]), int(v[3])
    concat = g.op(name, "Concat")
    if concat is None:
        return None
    tail = [g.consts.get(i) for i in concat.input[-2:]]
    parts = [g.consts.get(i) for i in concat.input]
    if any(t is None or t.size != 1 for t in tail) or sum(1 if p is None else p.size for p in parts) != 4:
        return None
    return int(tail[0].ravel()[0]), int(tail[1].ravel()[0])  # type: ignore[union-attr]


def _key(g: Graph, name: str) -> tuple[str, str, str, tuple[int, int]] | None:
    """The key projection under a transpose to [B, heads, d, S], spelled any of three ways."""
    tr = g.op(name, "Transpose")
    if tr is not None and _perm(tr) == [0, 2, 3, 1]:  # straight from the [B, S, heads, d] reshape
        return _projection(g, tr.input[0], heads_first=False)
    if tr is not None and _perm(tr) == [0, 1, 3, 2]:
        return _projection(g, tr.input[0])
    # torch dynamo: Reshape to [B*heads, S, d] -> Transpose(0, 2, 1) -> Reshape to [B, heads, d, S]
    outer = g.op(name, "Reshape")
    inner_tr = g.op(outer.input[0], "Transpose") if outer is not None else None
    inner = g.op(inner_tr.input[0], "Reshape") if inner_tr is not None and _perm(inner_tr) == [0, 2, 1] else None
    return _projection(g, inner.input[0]) if inner is not None else None


def match_attention(g: Graph, softmax: onnx.NodeProto) -> Match | str:
    """The attention block around ``softmax``, or why it is not one."""
    probs = softmax.output[0]
    users = g.consumers.get(probs, [])
    if {u.op_type for u in users} == {"IsNaN", "Where"} and len(users) == 2:  # SDPA's guard for empty rows
        isnan = next(u for u in users if u.op_type == "IsNaN")
        where = next(u for u in users if u.op_type == "Where")
        if list(where.input) != [isnan.output[0], where.input[1], probs] or g.scalar(where.input[1]) != 0.0:
            return "the Softmax's NaN guard is not Where(IsNaN(p), 0, p)"
        probs = where.output[0]
    av = g.only_consumer(probs, "MatMul")
    out_tr = g.only_consumer(av.output[0], "Transpose") if av is not None else None
    out_rs = g.only_consumer(out_tr.output[0], "Reshape") if out_tr is not None else None
    if av is None or out_rs is None or _perm(out_tr) != [0, 2, 1, 3] or av.input[0] != probs:
        return "the Softmax does not feed a MatMul with V and a [B, S, hidden] reshape"
    scores, mask = softmax.input[0], None
    add = g.op(scores, "Add")
    if add is not None:
        for s, m in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            if g.op(_scaled(g, s)[0], "MatMul") is not None:
                scores, mask = s, m
                break
    pre, post = _scaled(g, scores)
    qk = g.op(pre, "MatMul")
    if qk is None:
        return "no Q·Kᵀ MatMul before the Softmax"
    q4, q_scale = _scaled(g, qk.input[0])
    kt, k_scale = _scaled(g, qk.input[1])
    parts = [_projection(g, q4), _key(g, kt), _projection(g, av.input[1])]
    if any(p is None for p in parts):
        return "Q, K or V is not a MatMul + bias projection reshaped to heads"
    q, k, v = (p for p in parts if p is not None)
    if not q[0] == k[0] == v[0]:
        return "Q, K and V are projections of different tensors (cross-attention)"
    w = [g.consts[p[1]] for p in (q, k, v)]
    hidden = w[0].shape[0]
    if any(x.shape != (hidden, hidden) for x in w):
        return "Q, K and V weights are not all hidden × hidden"
    if not _merges_heads(g, out_rs.input[1], hidden):
        return "the attention output is not reshaped to [B, S, hidden]"
    heads = _heads(hidden, q[3])
    if heads is None or any(_heads(hidden, p[3]) != heads for p in (k, v)):
        return "the head count could not be read from the reshapes"
    return Match(
        x=q[0],
        weights=(q[1], k[1], v[1]),
        biases=(q[2], k[2], v[2]),
        heads=heads,
        scale=q_scale * k_scale * post,
        mask_bias=mask,
        output=out_rs.output[0],
    )


def _merges_heads(g: Graph, shape: str, hidden: int) -> bool:
    """Whether a Reshape target is 3-D with ``hidden`` (or -1) last: [B, S, heads, d] -> [B, S, hidden]."""
    if shape in g.consts:
        v = g.consts[shape].ravel()
        return v.size == 3 and int(v[2]) in (-1, hidden)
    concat = g.op(shape, "Concat")
    if concat is None:
        return False
    parts = [g.consts.get(i) for i in concat.input]
    last = parts[-1]
    return (
        last is not None
        and last.size == 1
        and int(last.ravel()[0]) in (-1, hidden)
        and sum(1 if p is None else p.size for p in parts) == 3
    )


def _heads(hidden: int, tail: tuple[int, int]) -> int | None:
    h, d = tail
    if h > 0 and (d == -1 or h * d == hidden):
        return h
    if d > 0 and h == -1 and hidden % d == 0:
        return hidden // d
    return None


def check_masks(model: onnx.ModelProto, masks: list[str]) -> tuple[str | None, float, str]:
    """The 2-D input every mask bias comes from (None when they do not all behave as a padding mask on it),
    the value masked positions get, and why not."""
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    candidates = [i for i in inputs if len(i.type.tensor_type.shape.dim) == 2 and "mask" in i.name.lower()]
    if len(candidates) != 1:
        return None, 0.0, "no single 2-D '*mask*' input to build the attention mask from"
    mask_input = candidates[0].name
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(m) for m in sorted(set(masks)))
    feeds = {}
    for i in inputs:
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        dims = [
            d.dim_value or (PROBE_MASK.shape[k] if k < 2 else 1) for k, d in enumerate(i.type.tensor_type.shape.dim)
        ]
        feeds[i.name] = PROBE_MASK.astype(dtype) if i.name == mask_input else np.zeros(dims, dtype=dtype)
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        values = sess.run(None, feeds)
    except Exception as exc:  # onnxruntime raises untyped errors; an unrunnable probe means: do not fuse
        return None, 0.0, f"the mask probe did not run ({str(exc)[:100]})"
    keep = PROBE_MASK.astype(bool)[:, None, None, :]
    filler = 0.0
    for bias in values:
        b = np.asarray(bias, dtype=np.float64)
        if b.ndim != 4 or b.shape[-1] != PROBE_MASK.shape[1] or b.shape[0] not in (1, PROBE_MASK.shape[0]):
            return None, 0.0, f"a mask bias of shape {list(b.shape)} is not [batch, heads, S, S]"
        full = np.broadcast_to(b, (PROBE_MASK.shape[0], b.shape[1], PROBE_MASK.shape[1], PROBE_MASK.shape[1]))
        keep_full = np.broadcast_to(keep, full.shape)
        if np.any(full[keep_full] != 0.0) or np.any(full[~keep_full] > MASKED_AT_MOST):
            return None, 0.0, "the mask bias is not a padding mask of the attention mask (causal, or other)"
        filler = float(full[~keep_full].max())
    return mask_input, max(filler, float(np.finfo(np.float32).min)), ""


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, str]:
    """``model`` with every matched self-attention block as one com.microsoft ``Attention`` node, how many
    were fused, and why none (or not all) were."""
    g = Graph(model)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    found = [match_attention(g, s) for s in softmaxes]
    matches = [m for m in found if isinstance(m, Match)]
    misses = sorted({m for m in found if isinstance(m, str)})
    if not matches:
        return model, 0, "; ".join(misses) or "no Softmax"
    masks = [m.mask_bias for m in matches if m.mask_bias is not None]
    mask_input, filler = None, 0.0
    if masks:
        mask_input, filler, why = check_masks(model, masks)
        if mask_input is None:
            return model, 0, why
    if len(masks) not in (0, len(matches)):
        return model, 0, "some attention blocks are masked and some are not"
    out = onnx.ModelProto()
    out.CopyFrom(model)
    at_output = {m.output: m for m in matches}
    nodes: list[onnx.NodeProto] = []
    mask_index = ""
    if mask_input is not None:
        mask_index = f"{mask_input}_int32_for_attention"
        nodes.append(helper.make_node("Cast", [mask_input], [mask_index], to=onnx.TensorProto.INT32))
    for node in model.graph.node:
        produced = [at_output[o] for o in node.output if o in at_output]
        if not produced:
            nodes.append(node)
            continue
        m = produced[0]
        i = len(nodes)
        w = np.concatenate([g.consts[n] for n in m.weights], axis=1)
        b = np.concatenate([g.consts[n] for n in m.biases])
        out.graph.initializer.extend(
            [
                numpy_helper.from_array(w, f"attention_{i}_qkv_weight"),
                numpy_helper.from_array(b, f"attention_{i}_qkv_bias"),
            ]
        )
        inputs = [m.x, f"attention_{i}_qkv_weight", f"attention_{i}_qkv_bias"] + ([mask_index] if mask_index else [])
        attention = helper.make_node("Attention", inputs, [m.output], f"Attention_{i}", domain=MS_DOMAIN)
        attention.attribute.extend(
            [helper.make_attribute("num_heads", m.heads), helper.make_attribute("scale", m.scale)]
        )
        if mask_index:
            attention.attribute.append(helper.make_attribute("mask_filter_value", filler))
        nodes.append(attention)
    del out.graph.node[:]
    out.graph.node.extend(_live(nodes, [o.name for o in out.graph.output]))
    _drop_unused_initializers(out)
    if not any(op.domain == MS_DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    note = f"{len(matches)} of {len(softmaxes)} Softmax fused" + (f" (others: {'; '.join(misses)})" if misses else "")
    return out, len(matches), note


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes that some graph output depends on, in their order."""
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
