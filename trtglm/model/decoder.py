"""Build the GLM decoder as an ONNX graph with a KV cache, directly in onnx-ir.

The graph is the plain, primitive-op form of transformers' eager GLM (the form other exporters
produce too); `trtglm.fusion` later rewrites it into fused ops. Weights are lazy tensors named
after the checkpoint's own parameters, read one at a time when the model is saved.

    input_ids [B,S] -> Gather(embed) -> L x layer -> RMSNorm -> MatMul(lm_head) -> logits [B,S,V] fp32
    attention_mask [B,P+S], position_ids [B,S]          past_key_values.{i}.key/value [B,KV,P,D]
                                                        present.{i}.key/value [B,KV,P+S,D]
    layer:  x + Attn(RMSNorm(x)) [+ post norm]  ->  x + MLP(RMSNorm(x)) [+ post norm]
            Attn: q/k/v projections [+ per-head q/k RMSNorm], partial rotary (interleaved or rotate-half), GQA
            MLP:  SiLU-gated, or from glm4_moe's first_k_dense layer on the routed + shared experts (moe.py)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from ..core.dtypes import BY_NUMPY, FLOATS
from . import mla, moe
from .config import GlmConfig
from .weights import WeightSpec

DTYPES = {name: ir.DataType(d.onnx) for name, d in FLOATS.items()}
IR_VERSION = {18: 10, 19: 10, 20: 10, 21: 10, 22: 10, 23: 11, 24: 12}
B, S, P, T = "batch", "sequence", "past_sequence", "total_sequence"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: int64, float32, float16, bfloat16
    shape: tuple[int | str, ...]

    def to_dict(self):
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def io_spec(c: GlmConfig, dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    kv_dtype = FLOATS[dtype].numpy
    dims = mla.cache_dims(c) if c.mla else ((c.num_kv_heads, c.head_dim),) * 2  # (heads, head_dim) of key, value
    inputs = [TensorSpec("input_ids", "int64", (B, S)), TensorSpec("attention_mask", "int64", (B, T)),
              TensorSpec("position_ids", "int64", (B, S))]
    outputs = [TensorSpec("logits", "float32", (B, S, c.vocab_size))]
    for i in range(c.num_layers):
        for kind, (heads, d) in zip(("key", "value"), dims):
            inputs.append(TensorSpec(f"past_key_values.{i}.{kind}", kv_dtype, (B, heads, P, d)))
            outputs.append(TensorSpec(f"present.{i}.{kind}", kv_dtype, (B, heads, T, d)))
    return inputs, outputs


class _Builder:
    """A tape with shorthands: `op(...)`, shared constants, lazy checkpoint weights."""

    def __init__(self, dtype: ir.DataType, opset: int):
        self.tape = ir.tape.Tape()
        self.dtype = dtype
        self.opset = opset
        self.initializers: dict[str, ir.Value] = {}
        self._consts: dict[tuple, ir.Value] = {}
        self.prefixes: dict[ir.Node, str] = {}  # node -> its name's prefix

    @contextlib.contextmanager
    def named(self, prefix: str):
        """Nodes made inside get names starting with `prefix`."""
        start = len(self.tape.nodes)
        yield
        self.prefixes.update((node, prefix) for node in self.tape.nodes[start:])

    def op(self, op_type: str, *inputs: ir.Value | None, name: str | None = None, **attrs) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes=attrs or None, name=name)

    def ops(self, op_type: str, *inputs: ir.Value, num_outputs: int, **attrs) -> list[ir.Value]:
        return list(self.tape.op_multi_out(op_type, list(inputs), attributes=attrs or None, num_outputs=num_outputs))

    def const(self, value, dtype=None) -> ir.Value:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            tensor = ir.tensor(array, name=name)
            v = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
            self._consts[key] = self.initializers[name] = v
        return self._consts[key]

    def compute_const(self, value: float) -> ir.Value:
        """A scalar in the compute dtype."""
        return self.const(np.array(value, dtype=np.float32).astype(self.dtype.numpy()))

    def weight(self, spec: WeightSpec, load: Callable[[WeightSpec], ir.TensorProtocol]) -> ir.Value:
        shape = (*spec.shape[:-2], spec.shape[-1], spec.shape[-2]) if spec.linear else spec.shape
        dtype = ir.DataType.FLOAT if spec.fp32 else self.dtype
        tensor = ir.LazyTensor(lambda: load(spec), dtype=dtype, shape=ir.Shape(shape), name=spec.name)
        v = ir.Value(name=spec.name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=tensor)
        self.initializers[spec.name] = v
        return v

    def cast(self, x: ir.Value, to: ir.DataType) -> ir.Value:
        return x if to == self.dtype == ir.DataType.FLOAT else self.op("Cast", x, to=to)


def build_decoder(c: GlmConfig, specs: dict[str, WeightSpec], load: Callable[[WeightSpec], ir.TensorProtocol],
                  dtype: str = "fp32", opset: int = 23) -> ir.Model:
    """The decoder graph; `load(spec)` returns the tensor for a weight, already in `dtype` and layout."""
    g = _Builder(DTYPES[dtype], opset)
    in_specs, out_specs = io_spec(c, dtype)
    inputs = {s.name: _value(s) for s in in_specs}
    W = {role: g.weight(spec, load) for role, spec in specs.items()
         if not (role == "lm_head" and c.tie_word_embeddings)}
    if c.tie_word_embeddings:
        W["lm_head"] = g.op("Transpose", W["embed"], perm=[1, 0])

    x = g.op("Gather", W["embed"], inputs["input_ids"])
    cos, sin = _rope_tables(g, c, inputs["position_ids"])
    bias = _attention_bias(g, inputs["input_ids"], inputs["attention_mask"])
    presents = []
    for i in range(c.num_layers):
        L = lambda role: W[f"layers.{i}.{role}"]  # noqa: E731
        h = _rms_norm(g, x, L("attn_norm"), c.rms_norm_eps)
        past = inputs[f"past_key_values.{i}.key"], inputs[f"past_key_values.{i}.value"]
        if c.mla:
            attn, k, v = mla.mla_attention(g, c, h, L, cos, sin, bias, *past, _rms_norm, _apply_rope)
        else:
            attn, k, v = _attention(g, c, h, L, cos, sin, bias, *past)
        presents += [k, v]
        if c.sandwich_norms:
            attn = _rms_norm(g, attn, L("post_attn_norm"), c.rms_norm_eps)
        x = g.op("Add", x, attn)
        h = _rms_norm(g, x, L("mlp_norm"), c.rms_norm_eps)
        mlp = moe.moe_mlp(g, c, h, L, _mlp) if c.is_moe_layer(i) else \
            _mlp(g, c.intermediate_size, h, L("gate_up"), L("down"))
        if c.sandwich_norms:
            mlp = _rms_norm(g, mlp, L("post_mlp_norm"), c.rms_norm_eps)
        x = g.op("Add", x, mlp)
    x = _rms_norm(g, x, W["final_norm"], c.rms_norm_eps)
    logits = g.cast(g.op("MatMul", x, W["lm_head"]), ir.DataType.FLOAT)

    outputs = [logits, *presents]
    for value, spec in zip(outputs, out_specs):
        value.name = spec.name
        value.type, value.shape = _value(spec).type, _value(spec).shape
    graph = ir.Graph(list(inputs.values()), outputs, nodes=g.tape.nodes,
                     initializers=list(g.initializers.values()), opset_imports={"": opset}, name="glm_decoder")
    _name_nodes(graph, g.prefixes)
    return ir.Model(graph, ir_version=IR_VERSION[opset], producer_name="trtglm")


def _value(spec: TensorSpec) -> ir.Value:
    dtype = ir.DataType(BY_NUMPY[spec.dtype].onnx)
    return ir.Value(name=spec.name, type=ir.TensorType(dtype), shape=ir.Shape(spec.shape))


def _name_nodes(graph: ir.Graph, prefixes: dict[ir.Node, str]) -> None:
    """Stable, unique node names (`/layers.3/MatMul_2`-style is not needed: op_type + index), after a prefix
    where the builder gave one."""
    counts: dict[str, int] = {}
    for node in graph:
        n = counts.get(node.op_type, 0)
        counts[node.op_type] = n + 1
        node.name = f"{prefixes.get(node, '')}{node.op_type}_{n}"


def _rms_norm(g: _Builder, x: ir.Value, weight: ir.Value, eps: float) -> ir.Value:
    """weight * (x / sqrt(mean(x^2) + eps)), the reduction in fp32 as in transformers."""
    xf = g.cast(x, ir.DataType.FLOAT)
    var = g.op("ReduceMean", g.op("Pow", xf, g.const(2.0, np.float32)), g.const([-1], np.int64), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32))))
    return g.op("Mul", weight, g.cast(g.op("Mul", xf, inv), g.dtype))


def _rope_tables(g: _Builder, c: GlmConfig, position_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
    """cos/sin [B,1,S,rot], computed once per graph: each frequency repeated twice for interleaved pairs, or
    the frequencies twice over for rotate-half."""
    half = c.rotary_dim // 2
    inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.rotary_dim, 2, dtype=np.float32) / c.rotary_dim))
    pos = g.op("Unsqueeze", g.op("Cast", position_ids, to=ir.DataType.FLOAT), g.const([-1], np.int64))
    freqs = g.op("Mul", pos, g.const(inv_freq.astype(np.float32)))  # [B,S,rot/2]
    tables = []
    for fn in ("Cos", "Sin"):
        if c.rotary_layout == "half":
            t = g.op(fn, freqs)
            t = g.op("Concat", t, t, axis=-1)  # [B,S,rot]
        else:
            t = g.op("Unsqueeze", g.op(fn, freqs), g.const([-1], np.int64))  # [B,S,rot/2,1]
            t = g.op("Reshape", g.op("Concat", t, t, axis=-1), g.const([0, 0, 2 * half], np.int64))
        tables.append(g.cast(g.op("Unsqueeze", t, g.const([1], np.int64)), g.dtype))  # [B,1,S,rot]
    return tables[0], tables[1]


def _apply_rope(g: _Builder, c: GlmConfig, x: ir.Value, cos: ir.Value, sin: ir.Value,
                width: int | None = None) -> ir.Value:
    """x [B,H,S,D]: in the first rotary_dim channels, rotate pairs (x0,x1) -> (-x1,x0), or halves
    (x1,x2) -> (-x2,x1) for rotate-half."""
    rot, width = c.rotary_dim, width or c.head_dim  # width: the last axis of x
    x_rot = x if rot == width else g.op("Slice", x, g.const([0], np.int64), g.const([rot], np.int64),
                                              g.const([-1], np.int64))
    if c.rotary_layout == "half":
        x1 = g.op("Slice", x_rot, g.const([0], np.int64), g.const([rot // 2], np.int64), g.const([-1], np.int64))
        x2 = g.op("Slice", x_rot, g.const([rot // 2], np.int64), g.const([rot], np.int64), g.const([-1], np.int64))
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    else:
        pairs = g.op("Reshape", x_rot, g.const([0, 0, 0, rot // 2, 2], np.int64))
        x1, x2 = g.ops("Split", pairs, g.const([1, 1], np.int64), num_outputs=2, axis=-1)
        rotated = g.op("Reshape", g.op("Concat", g.op("Neg", x2), x1, axis=-1), g.const([0, 0, 0, rot], np.int64))
    out = g.op("Add", g.op("Mul", x_rot, cos), g.op("Mul", rotated, sin))
    if rot == width:
        return out
    x_pass = g.op("Slice", x, g.const([rot], np.int64), g.const([width], np.int64), g.const([-1], np.int64))
    return g.op("Concat", out, x_pass, axis=-1)


def _attention_bias(g: _Builder, input_ids: ir.Value, mask: ir.Value) -> ir.Value:
    """Additive fp32 mask [B,1,S,T]: 0 where query s may see key t, else the fp32 minimum.

    Query s sits at absolute position P+s with P = T-S, so the causal band is aligned to the
    lower right (decode and chunked prefill see all the past). A key is visible if it is not
    padding, or if it is the query itself: a padding row then attends to itself instead of to
    nothing, so no kernel can turn it into NaN that would reach the KV cache. Real rows are
    unaffected (a real token is never padding).
    """
    total = g.op("Squeeze", g.op("Shape", mask, start=1, end=2), g.const([0], np.int64))
    seq = g.op("Squeeze", g.op("Shape", input_ids, start=1, end=2), g.const([0], np.int64))
    one = g.const(1, np.int64)
    kv_pos = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), total, one), g.const([0], np.int64))  # [1,T]
    q_pos = g.op("Unsqueeze", g.op("Range", g.op("Sub", total, seq), total, one), g.const([1], np.int64))  # [S,1]
    causal = g.op("LessOrEqual", kv_pos, q_pos)  # [S,T]
    itself = g.op("Equal", kv_pos, q_pos)  # [S,T]
    keep = g.op("Unsqueeze", g.op("Cast", mask, to=ir.DataType.BOOL), g.const([1, 2], np.int64))  # [B,1,1,T]
    allowed = g.op("And", causal, g.op("Or", keep, itself))  # [B,1,S,T]
    return g.op("Where", allowed, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32))


def _attention(g: _Builder, c: GlmConfig, h: ir.Value, L, cos, sin, bias, past_k, past_v):
    H, KV, D = c.num_heads, c.num_kv_heads, c.head_dim
    if c.fused_qkv:
        qkv = g.op("MatMul", h, L("qkv"))
        if c.attention_bias:
            qkv = g.op("Add", qkv, L("qkv_bias"))
        q, k, v = g.ops("Split", qkv, g.const([H * D, KV * D, KV * D], np.int64), num_outputs=3, axis=-1)
    else:
        q, k, v = (g.op("MatMul", h, L(r)) for r in "qkv")
        if c.attention_bias:
            q, k, v = (g.op("Add", t, L(f"{r}_bias")) for t, r in zip((q, k, v), "qkv"))

    def heads(t, n, norm=None):  # [B,S,n*D] -> [B,n,S,D], normalized per head first (qk-norm)
        t = g.op("Reshape", t, g.const([0, 0, n, D], np.int64))
        if norm is not None:
            t = _rms_norm(g, t, norm, c.rms_norm_eps)
        return g.op("Transpose", t, perm=[0, 2, 1, 3])

    q = _apply_rope(g, c, heads(q, H, L("q_norm") if c.qk_norm else None), cos, sin)
    k = _apply_rope(g, c, heads(k, KV, L("k_norm") if c.qk_norm else None), cos, sin)
    present_k = g.op("Concat", past_k, k, axis=2)
    present_v = g.op("Concat", past_v, heads(v, KV), axis=2)
    k_all, v_all = (_repeat_kv(g, t, KV, H // KV) for t in (present_k, present_v))

    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k_all, perm=[0, 1, 3, 2])), g.compute_const(D ** -0.5))
    probs = g.op("Softmax", g.op("Add", g.cast(scores, ir.DataType.FLOAT), bias), axis=-1)
    out = g.op("MatMul", g.cast(probs, g.dtype), v_all)  # [B,H,S,D]
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, H * D], np.int64))
    return g.op("MatMul", out, L("o")), present_k, present_v


def _repeat_kv(g: _Builder, x: ir.Value, kv_heads: int, n_rep: int) -> ir.Value:
    """[B,KV,T,D] -> [B,KV*n_rep,T,D], each KV head repeated n_rep times (grouped-query attention)."""
    if n_rep == 1:
        return x
    shape = g.op("Shape", x)
    batch = g.op("Slice", shape, g.const([0], np.int64), g.const([1], np.int64))
    rest = g.op("Slice", shape, g.const([2], np.int64), g.const([4], np.int64))  # [T, D]
    expanded_shape = g.op("Concat", batch, g.const([kv_heads, n_rep], np.int64), rest, axis=0)
    expanded = g.op("Expand", g.op("Unsqueeze", x, g.const([2], np.int64)), expanded_shape)
    merged_shape = g.op("Concat", batch, g.const([kv_heads * n_rep], np.int64), rest, axis=0)
    return g.op("Reshape", expanded, merged_shape)


def _mlp(g: _Builder, I: int, h: ir.Value, gate_up: ir.Value, down: ir.Value) -> ir.Value:  # noqa: E741
    gate, up = g.ops("Split", g.op("MatMul", h, gate_up), g.const([I, I], np.int64), num_outputs=2, axis=-1)
    act = g.op("Mul", up, g.op("Mul", gate, g.op("Sigmoid", gate)))
    return g.op("MatMul", act, down)
