"""ONNX files as trtglm reads and writes them: a description of a graph's IO and ops, its KV-cache dtype,
writing a changed graph in place, and releasing memory-mapped weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .dtypes import BY_ONNX, FLOATS
from .errors import TrtglmError
from .files import atomic_file


def describe_onnx(path: Path) -> dict:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise TrtglmError(f"{path}: cannot be read as ONNX ({str(e).splitlines()[0]})") from None
    names = {v: onnx.TensorProto.DataType.Name(v).lower() for v in onnx.TensorProto.DataType.values()}

    def io(values):
        return [{"name": v.name, "dtype": names[v.type.tensor_type.elem_type],
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "inputs": io(model.graph.input), "outputs": io(model.graph.output),
            "nodes": len(model.graph.node), "ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
            "initializer_dtypes": dict(Counter(names[i.data_type] for i in model.graph.initializer))}


def graph_dtype(onnx_path: Path) -> str:
    import onnx

    try:
        model = onnx.load(onnx_path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line
        raise TrtglmError(f"{onnx_path}: cannot be read as ONNX ({str(e).splitlines()[0]})") from None
    names = {code: d.name for code, d in BY_ONNX.items() if d.name in FLOATS}
    for i in model.graph.input:
        if i.name.startswith("past_key_values."):
            return names.get(i.type.tensor_type.elem_type, "fp32")
    return "fp32"


def save_graph(model, onnx_path: Path) -> None:
    """Write `model` (onnx-ir) over `onnx_path` through a sibling file; its untouched weights stay references
    into the same external data file, which is not rewritten."""
    import onnx_ir as ir

    with atomic_file(onnx_path) as tmp:
        ir.save(model, tmp)


def save_streaming(model, onnx_path: Path, data_file: str) -> None:
    """`model` (onnx-ir) saved with its weights in `data_file`, each source weight unmapped once written: a model
    whose weights are memory-mapped from another file (an export) never has them all resident at once."""
    import onnx_ir as ir

    written: list = []

    def release_previous(tensor, info) -> None:  # called before each tensor is written
        while written:
            done = written.pop()
            if isinstance(done, ir.ExternalTensor):
                done.release()
        written.append(tensor)

    ir.save(model, onnx_path, external_data=data_file, max_in_flight_bytes=256 << 20, callback=release_previous)
    release_weights(model)


def release_weights(model) -> None:
    """Unmap `model`'s external weights (onnx-ir keeps them memory-mapped; mapped pages count as resident)."""
    import gc

    import onnx_ir as ir

    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.release()
    gc.collect()
