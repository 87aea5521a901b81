"""Weight-only int8 and int4 of the stacked expert weights of a mixture-of-experts graph.

    W [E,K,N] ─ Gather(ids) ─ MatMul      ==>   W_q [E,K,N] int8|int4 ─ DequantizeLinear(scale [E,K/b,N],
                                                                        axis 1, block b) ─ Gather(ids) ─ MatMul

Symmetric (no zero point), one scale per expert, output channel and block of K (int8: the block is all of K,
a scale per expert and channel; int4: precision.quantization.block_size). The scales come from the weights
alone, so every expert has its own whether or not calibration tokens reach it. ONNX Runtime's quantizers
only take a MatMul whose weight is an initializer: the expert MatMuls read a Gather of the stacked weights,
hence this pass. The dequantization comes before the Gather: TensorRT-RTX builds that form with the weights
kept quantized in the engine, and neither it nor ONNX Runtime gathers int4 tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QMAX = {"int8": 127, "int4": 7}


def expert_gathers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gather nodes that pick experts out of a stacked [E,K,N] weight for a MatMul."""
    inits = {t.name: t for t in model.graph.initializer}
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    return [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
            and len(inits[n.input[0]].dims) == 3 and n.output[0] in matmul_weights]


def quantize_experts(model: onnx.ModelProto, dtype: str, block_size: int) -> dict:
    """Rewrite `model` in place; returns the record for the manifest. An int4 block must divide the experts' input
    width (the precision stage checks it before any quantization)."""
    gathers = expert_gathers(model)
    inits = {t.name: t for t in model.graph.initializer}
    weights = 0
    for gather in gathers:
        name = gather.input[0]
        tensor = inits[name]
        block = tensor.dims[1] if dtype == "int8" else block_size
        w = _array(tensor)
        model.graph.initializer.remove(tensor)
        del inits[name], tensor
        q, scale = quantize(w, block, QMAX[dtype])
        del w
        model.graph.initializer.extend([_tensor(q, f"{name}_quantized", dtype),
                                        numpy_helper.from_array(scale, f"{name}_scale")])
        dq = helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale"], [f"{name}_dequantized"],
                              name=f"{name}_DequantizeLinear", axis=1, block_size=block)
        index = list(model.graph.node).index(gather)
        model.graph.node.insert(index, dq)
        gather.input[0] = dq.output[0]
        weights += q.size
    return {"stacked_weights": len(gathers), "parameters": weights, "scales": "per expert, output channel" +
            ("" if dtype == "int8" else f" and block of {block_size}") + ", from the weights (weight-only)"}


def _array(tensor: TensorProto) -> np.ndarray:
    """The fp32 weights, read once (a view of the bytes, not a second conversion)."""
    if tensor.data_type == TensorProto.FLOAT and tensor.raw_data:
        return np.frombuffer(tensor.raw_data, np.float32).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor).astype(np.float32, copy=False)


def quantize(w: np.ndarray, block: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [E,K,N] within +-qmax, scale fp32 [E,K/block,N]): q * scale (repeated over each block) ~ w. One expert
    at a time: the temporaries are one expert's, not the stack's (a layer's whole gate_up stack, at real sizes)."""
    e, k, n = w.shape
    q = np.empty((e, k, n), np.int8)
    scale = np.empty((e, k // block, n), np.float32)
    for i in range(e):
        blocks = w[i].reshape(k // block, block, n)
        amax = np.abs(blocks).max(axis=1)
        scale[i] = np.where(amax > 0, amax / qmax, 1.0)
        q[i] = np.clip(np.rint(blocks / scale[i][:, None, :]), -qmax, qmax).reshape(k, n)
    return q, scale


def _tensor(q: np.ndarray, name: str, dtype: str) -> TensorProto:
    if dtype == "int8":
        return numpy_helper.from_array(q, name)
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)  # ONNX int4: the first element in the low nibble
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(q.shape))
    t.raw_data = packed.tobytes()
    return t
