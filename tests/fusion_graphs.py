"""Micro-graphs for the fusion rules, and ONNX Runtime before/after comparison (its optimizations off)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as passes

from trtglm.model import decoder as G
from trtglm.model.config import GlmConfig

CFG = GlmConfig(family="glm", vocab_size=16, hidden_size=64, intermediate_size=32, num_layers=1, num_heads=4,
                num_kv_heads=2, head_dim=16, rotary_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                attention_bias=True, max_position_embeddings=64)
F32, F16, I64, BOOL = ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.INT64, ir.DataType.BOOL


def config(**changes) -> GlmConfig:
    return dataclasses.replace(CFG, **changes)


def micro(build, inputs: dict[str, tuple[ir.DataType, tuple]], dtype=F32) -> ir.Model:
    """A model from `build(g, *inputs)` written with trtglm.model.decoder's builder."""
    g = G._Builder(dtype, 23)
    values = [ir.Value(name=n, type=ir.TensorType(t), shape=ir.Shape(s)) for n, (t, s) in inputs.items()]
    outs = build(g, *values)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    outs = [g.op("Neg", o) for o in outs]  # as in a real graph, fused subgraphs feed further nodes (not outputs)
    for i, o in enumerate(outs):
        o.name = f"out{i}"
    graph = ir.Graph(values, outs, nodes=g.tape.nodes, initializers=list(g.initializers.values()),
                     opset_imports={"": 23})
    model = ir.from_proto(ir.to_proto(ir.Model(graph, ir_version=11)))  # named values, as when loaded from a file
    passes.ShapeInferencePass()(model)
    return model


def weight(g: G._Builder, array: np.ndarray, name: str) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    v = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
    g.initializers[name] = v
    return v


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    proto = ir.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ops(model: ir.Model) -> list[str]:
    """Op types, without the trailing Neg consumers that micro() adds."""
    consumers = {o.producer() for o in model.graph.outputs}
    return [n.op_type for n in model.graph if n not in consumers]
