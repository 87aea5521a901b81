"""RMSNorm chain -> RMSNormalization (opset 23).

        x ──[Cast fp32]──┬─────────────────────────────────────────┐
                         └─ Pow(2) ─ ReduceMean(-1) ─ Add(eps) ─ Sqrt ─ Reciprocal ─ Mul ─[Cast]─ Mul(scale) ─> y
                                                                        or  Div(x, Sqrt(...)) ─[Cast]─ Mul(scale)

    ==>  RMSNormalization(x, scale, axis=-1, epsilon=eps, stash_type=fp32) ─> y

The reduction is always computed in fp32 (stash_type), so the fused op is at least as accurate as
the chain with its fp32 Casts.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


class RmsNorm(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, divide: bool, scale_first: bool):
        super().__init__(name)
        self.divide, self.scale_first = divide, scale_first

    def pattern(self, op, x, scale, eps, compute_type, out_type):
        xc = pattern.OrValue([op.Cast(x, to=compute_type), x])
        # other attributes (noop_with_empty_axes) cannot matter: the axes are not empty
        mean_sq = op.ReduceMean(op.Pow(xc, 2.0), [-1], keepdims=1, _allow_other_attributes=True)
        rms = op.Sqrt(op.Add(mean_sq, eps))
        normed = op.Div(xc, rms) if self.divide else op.Mul(xc, op.Reciprocal(rms))
        normed = pattern.OrValue([op.Cast(normed, to=out_type), normed])
        return op.Mul(scale, normed) if self.scale_first else op.Mul(normed, scale)

    def check(self, context, x, scale, eps, **_):
        result = pattern.MatchResult()
        eps_value = eps.const_value
        if eps_value is None or eps_value.size != 1:
            return result.fail("epsilon is not a constant scalar", eps)
        if eps_value.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
            return result.fail(f"epsilon is {eps_value.dtype}, not a float", eps)
        if x.dtype not in FLOATS or scale.dtype not in FLOATS:
            return result.fail("input or scale is not a float tensor", [x, scale])
        if scale.shape is None or scale.shape.rank() != 1:
            return result.fail("scale is not a 1-D tensor (not a per-channel RMSNorm weight)", scale)
        if x.shape is not None and x.shape.rank() and x.shape[-1] != scale.shape[0]:
            return result.fail(f"scale has {scale.shape[0]} channels, input has {x.shape[-1]}", [x, scale])
        return result

    def rewrite(self, op, x, scale, eps, **_):
        y = op.RMSNormalization(x, scale, axis=-1, epsilon=float(np.asarray(eps.const_value.numpy()).item()),
                                stash_type=ir.DataType.FLOAT)
        return y if x.dtype == scale.dtype else op.Cast(y, to=scale.dtype)


# onnxscript's commute() cannot clone OrValue patterns, so both operand orders of the last Mul are spelled out.
RULES = [RmsNorm.rule(f"rms_norm{'_div' if div else ''}{'' if first else '_scale_last'}", divide=div, scale_first=first)
         for div in (False, True) for first in (True, False)]
