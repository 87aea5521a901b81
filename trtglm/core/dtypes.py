"""Every dtype trtglm names, in one table: the floating-point precisions of exports and KV caches under
trtglm's names (fp32, fp16, bf16), their numpy/torch and ONNX spellings and their sizes, and the integer ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # trtglm's: fp32, fp16, bf16 (int64 for ids)
    numpy: str  # numpy's, torch's and the manifests' IO specs': float32, float16, bfloat16, int64
    onnx: int  # onnx.TensorProto's data type
    bytes: int


FLOATS = {d.name: d for d in (DType("fp32", "float32", 1, 4), DType("fp16", "float16", 10, 2),
                              DType("bf16", "bfloat16", 16, 2))}
INT64 = DType("int64", "int64", 7, 8)
BY_NUMPY = {d.numpy: d for d in (*FLOATS.values(), INT64)} | {"float": FLOATS["fp32"]}  # ONNX calls fp32 "float"
BY_ONNX = {d.onnx: d for d in (*FLOATS.values(), INT64)}


def compute_dtype(precision: str) -> DType:
    """The dtype a build of `precision` computes and keeps its KV cache in: quantized builds compute in fp16."""
    return FLOATS.get(precision, FLOATS["fp16"])
