"""int8 W8A8 MatMuls as ONNX Runtime integer GEMMs (MatMulIntegerToFloat), for its CPU provider.

    x ─ QuantizeLinear(s, z:int8) ─ DequantizeLinear(s, z) ──────────┐
                           W:int8 ─ DequantizeLinear(sw, zw, axis=1) ─ MatMul ─> y

    ==>  x ─ QuantizeLinear(s, z+128:uint8) ─ MatMulIntegerToFloat(W, s, sw, z+128, zw) ─[Cast]─> y

The same quantized values (shifted by 128: saturating at 0/255 is saturating at -128/127), multiplied
in integers and scaled once, as TensorRT's int8 GEMM does. Why: the build's graph computes in fp16 around
its Q/DQ pairs, and the CPU provider has no GEMM for that: it dequantizes every weight at every step, or
with `session.disable_quant_qdq` once at load into fp32, reading 4 bytes per weight at decode instead of 1.
A is uint8 because MLAS's x86 integer GEMMs take an unsigned left operand (`python bench/kernels.py`: a decode-step
GEMM with a signed one took 1000 us, with an unsigned one 56, fp32 MatMul 66).

The ONNX Runtime backend applies this in memory when it loads a graph on the CPU; the build's model.onnx
(TensorRT's graph) is never changed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as passes
from onnxscript.rewriter import pattern

MS_DOMAIN = "com.microsoft"


class IntegerMatMul(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, a_scale, a_zero, a_scale2, a_zero2, w, w_scale, w_zero):
        q = op.QuantizeLinear(x, a_scale, a_zero, _allow_other_attributes=True, _outputs=["q"])
        a = op.DequantizeLinear(q, a_scale2, a_zero2, _allow_other_attributes=True)
        b = op.DequantizeLinear(w, w_scale, w_zero, _allow_other_attributes=True, _outputs=["b"])
        return op.MatMul(a, b)

    def check(self, context, x, a_scale, a_zero, a_scale2, a_zero2, w, w_scale, w_zero, q, b, **_):
        result = pattern.MatchResult()
        for v in (a_scale, a_zero, a_scale2, a_zero2, w, w_scale, w_zero):
            if v.const_value is None:
                return result.fail(f"{v.name} is not a constant", v)
        if w.dtype != ir.DataType.INT8 or a_zero.dtype != ir.DataType.INT8 or w.shape is None or w.shape.rank() != 2:
            return result.fail("not an int8 activation and a 2-D int8 weight", [a_zero, w])
        if a_scale.const_value.size != 1 or a_zero.const_value.size != 1:
            return result.fail("the activation is not quantized per tensor", a_scale)
        if not (_same(a_scale, a_scale2) and _same(a_zero, a_zero2)):
            return result.fail("the activation's QuantizeLinear and DequantizeLinear disagree", [a_scale2, a_zero2])
        per_column = w_scale.const_value.size != 1
        axis = b.producer().attributes.get_int("axis", 1)
        if per_column and (w_scale.shape.rank() != 1 or axis not in (1, -1) or w_scale.shape[0] != w.shape[1]):
            return result.fail("the weight's scales are neither per tensor nor per output column", w_scale)
        if b.producer().attributes.get_int("block_size", 0):
            return result.fail("the weight is quantized blockwise", w_scale)
        if a_scale2.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):  # the dtype of the MatMul
            return result.fail(f"the activation is dequantized to {a_scale2.dtype}", a_scale2)
        return result

    def rewrite(self, op, x, a_scale, a_zero, a_scale2, w, w_scale, w_zero, **_):
        zero = (a_zero.const_value.numpy().astype(np.int16) + 128).astype(np.uint8).reshape(())
        q = op.QuantizeLinear(x, a_scale, op.Constant(value=ir.tensor(zero)))
        w_zeros = w_zero.const_value.numpy()
        y = op.MatMulIntegerToFloat(q, w, _float32(op, a_scale), _float32(op, w_scale), op.Constant(value=ir.tensor(zero)),
                                    *([w_zero] if w_zeros.any() else []), _domain=MS_DOMAIN)
        return y if a_scale2.dtype == ir.DataType.FLOAT else op.Cast(y, to=a_scale2.dtype)


def _same(a: ir.Value, b: ir.Value) -> bool:
    return a is b or np.array_equal(a.const_value.numpy(), b.const_value.numpy())


def _float32(op, value: ir.Value) -> ir.Value:
    return op.Constant(value=ir.tensor(value.const_value.numpy().astype(np.float32)))


RULES = pattern.RewriteRuleSet([IntegerMatMul.rule("integer_matmul")])


def lower(model: ir.Model) -> int:
    """Rewrite every matching MatMul of `model` in place; the number rewritten."""
    count = RULES.apply_to_model(model)
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        passes.RemoveUnusedNodesPass()(model)  # and the replaced zero points and scales
    return count
