"""int8 W8A8 MatMuls as ONNX Runtime integer GEMMs (MatMulIntegerToFloat), for its CPU provider.

    x ─ QuantizeLinear(s, z:int8) ─ DequantizeLinear(s, z) ──────────┐
                           W:int8 ─ DequantizeLinear(sw, zw, axis=1) ─ MatMul ─> y

    ==>  u8s8:  x ─ QuantizeLinear(s, z+128:uint8) ─ MatMulIntegerToFloat(W,     s, sw, z+128, zw)     ─[Cast]─> y
         u8u8:  x ─ QuantizeLinear(s, z+128:uint8) ─ MatMulIntegerToFloat(W+128, s, sw, z+128, zw+128) ─[Cast]─> y

The same quantized values (shifted by 128: saturating at 0/255 is saturating at -128/127), multiplied
in integers and scaled once, as TensorRT's int8 GEMM does. Why: the build's graph computes in fp16 around
its Q/DQ pairs, and the CPU provider has no GEMM for that: it dequantizes every weight at every step, or
with `session.disable_quant_qdq` once at load into fp32, reading 4 bytes per weight at decode instead of 1.
The left operand is unsigned because ONNX Runtime's fast x86 integer GEMMs (MLAS) take an unsigned one
(`python bench/kernels.py` times each form).

Which form is exact depends on the CPU (`select_form`):
- u8s8 multiplies byte pairs with VPMADDUBSW on x86 CPUs without VNNI, whose int16 pair sums saturate
  (255 x 127 x 2 > 32767): wrong numbers. With AVX-512 VNNI (and AMX, whose CPUs have it) MLAS uses
  VPDPBUSD, exact and the fastest.
- u8u8 widens both operands to int16 before multiplying (VPMADDWD on x86, widening or UDOT on ARM): exact
  on every CPU. The weights are shifted by 128 (Cast and Add that ONNX Runtime folds at load) with a zero
  point of 128 (plus their own).
- dequantize leaves the Q/DQ graph as it is (ONNX Runtime folds the weights into fp32 at load): exact,
  4 bytes per weight read.

The ONNX Runtime backend applies this in memory when it loads a graph on the CPU; the build's model.onnx
(TensorRT's graph) is never changed.
"""

from __future__ import annotations

import platform

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as passes
from onnxscript.rewriter import pattern

MS_DOMAIN = "com.microsoft"
FORMS = ("u8s8", "u8u8", "dequantize")
# ONNX Runtime's own optimizer fuses Q/DQ MatMuls into u8s8 integer GEMMs: a session over a quantized graph
# turns that off, so what runs is the form chosen here
NO_QDQ_FUSION = ("session.disable_quant_qdq", "1")


def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set features as the CPUID instruction reports them (through numpy's dispatcher),
    never /proc/cpuinfo: under user-mode emulation that file describes the host, not the emulated CPU."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return frozenset(name for name, present in __cpu_features__.items() if present)


def select_form(features: frozenset[str] | None = None, machine: str | None = None) -> tuple[str, str]:
    """The exact integer GEMM form for this CPU, and why, in a few words."""
    features = cpu_features() if features is None else features
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if "AVX512VNNI" in features:
            return "u8s8", "AVX-512 VNNI: exact u8s8 dot products"
        if "AVX2" in features:
            return "u8u8", "AVX2 without VNNI: u8s8 would saturate int16 pair sums"
        return "u8u8", "x86 without AVX2: u8s8 may saturate"
    return "u8u8", f"{machine}: widening u8u8, exact on every CPU"


class IntegerMatMul(pattern.RewriteRuleClassBase):
    def __init__(self, unsigned_weights: bool):
        super().__init__(f"integer_matmul_{'u8u8' if unsigned_weights else 'u8s8'}")
        self.unsigned_weights = unsigned_weights

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
        zero = _shifted(a_zero.const_value.numpy()).reshape(())
        q = op.QuantizeLinear(x, a_scale, op.Constant(value=ir.tensor(zero)))
        w_zeros = w_zero.const_value.numpy()
        if self.unsigned_weights:
            # shifted by ops that ONNX Runtime folds once at load (the weight may live in an external data file)
            wide = op.Add(op.Cast(w, to=ir.DataType.INT16), op.Constant(value=ir.tensor(np.array(128, np.int16))))
            weight = op.Cast(wide, to=ir.DataType.UINT8)
            weight_zero = [op.Constant(value=ir.tensor(_shifted(w_zeros)))]
        else:
            weight, weight_zero = w, [w_zero] if w_zeros.any() else []
        y = op.MatMulIntegerToFloat(q, weight, _float32(op, a_scale), _float32(op, w_scale),
                                    op.Constant(value=ir.tensor(zero)), *weight_zero, _domain=MS_DOMAIN)
        return y if a_scale2.dtype == ir.DataType.FLOAT else op.Cast(y, to=a_scale2.dtype)


def _shifted(values: np.ndarray) -> np.ndarray:
    """int8 -> uint8 by adding 128: the same quantized values on the unsigned scale."""
    return (values.astype(np.int16) + 128).astype(np.uint8)


def _same(a: ir.Value, b: ir.Value) -> bool:
    return a is b or np.array_equal(a.const_value.numpy(), b.const_value.numpy())


def _float32(op, value: ir.Value) -> ir.Value:
    return op.Constant(value=ir.tensor(value.const_value.numpy().astype(np.float32)))


def lower(model: ir.Model, form: str | None = None) -> int:
    """Rewrite every matching MatMul of `model` in place into `form` (default: `select_form()`); the number
    rewritten. `dequantize` rewrites nothing."""
    form = form or select_form()[0]
    if form not in FORMS:
        raise ValueError(f"unknown integer GEMM form {form!r}: {', '.join(FORMS)}")
    if form == "dequantize":
        return 0
    count = pattern.RewriteRuleSet([IntegerMatMul.rule(unsigned_weights=form == "u8u8")]).apply_to_model(model)
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        passes.RemoveUnusedNodesPass()(model)  # and the replaced zero points and scales
    return count
