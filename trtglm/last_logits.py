"""Logits of the last position only (`shapes.logits: last`): the lm_head reads one row per sequence.

    hidden [B,S,H] ─[Q ─ DQ]─ MatMul(lm_head) ─[Cast]─> logits [B,S,V]
    ==>  hidden ─ Slice(axis 1, -1:) ─[Q ─ DQ]─ MatMul(lm_head) ─[Cast]─> logits [B,1,V]

Generation needs only the last position's logits after a prefill (prompts are left-padded, so that is
every row's last token), and decode steps have one position anyway. For a prefill of S tokens this saves
S-1 rows of the largest GEMM (vocab x hidden) and of the logits buffer: for GLM-4-9B (vocab 151552) that
buffer is 0.6 MB per token per row in fp32. Perplexity needs every position: `trtglm eval` refuses such a
build, and the build's accuracy gate runs before this step.

Only the graph changes; the weights file is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from .atomic import save_graph
from .errors import TrtglmError
from .fusion.tables import add_initializer

PASS_THROUGH = ("Cast", "Identity")


def keep_last_position(onnx_path: Path) -> str:
    """Rewrite `onnx_path` (its graph only) so that `logits` has one position; returns the lm_head's name."""
    model = ir.load(onnx_path)
    if any(node.name == "last_position" for node in model.graph):
        raise TrtglmError(f"{onnx_path}: the graph computes the last position's logits already")
    head = lm_head(model.graph)
    # a quantized lm_head reads its input through a per-tensor Q -> DQ pair: slice before it, keeping the pair
    # next to the MatMul (TensorRT fuses DQ+MatMul; ONNX Runtime's integer GEMM lowering matches Q-DQ-MatMul)
    reader = head
    producer = head.inputs[0].producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        quantize = producer.inputs[0].producer()
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            reader = quantize
    hidden = reader.inputs[0]  # other readers of it (none in trtglm's graphs) keep every position
    bounds = [add_initializer(model.graph, np.array([value], np.int64), f"last_position.{name}")
              for name, value in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))]
    last = ir.node("Slice", [hidden, *bounds], name="last_position")
    last.outputs[0].name = f"{hidden.name}.last_position"
    last.outputs[0].type = hidden.type  # None where the graph has no value info (quantized graphs)
    model.graph.insert_before(reader, last)
    reader.replace_input_with(0, last.outputs[0])
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    if logits.shape is not None and logits.shape.rank() == 3:
        logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[2]])
    save_graph(model, onnx_path)
    return head.name


def lm_head(graph: ir.Graph) -> ir.Node:
    """The MatMul computing `logits` (through Casts)."""
    outputs = [v for v in graph.outputs if v.name == "logits"]
    node = outputs[0].producer() if outputs else None
    while node is not None and node.op_type in PASS_THROUGH:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "MatMul":
        raise TrtglmError("logits: last needs a graph whose `logits` output is computed by a MatMul (the lm_head)")
    return node

