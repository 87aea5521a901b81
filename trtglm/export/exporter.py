"""`trtglm export`: checkpoint -> OUT_DIR/{model.onnx, model.onnx.data, export.json, tokenizer files}."""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

from ..core.dtypes import FLOATS
from ..core.errors import UsageError
from ..core.files import atomic_dir, sha256
from ..core.progress import SILENT, Progress
from ..core.versions import tool_versions
from ..model.checkpoint import Checkpoint, open_checkpoint
from ..model.decoder import DTYPES, IR_VERSION, build_decoder, io_spec
from ..model.weights import WeightSpec
from .directory import DATA_FILE, FORMAT_VERSION, META_FILE, ONNX_FILE
from .validate import check_memory
from .validate import validate as run_validation


def export(model: str, out_dir: str | Path, dtype: str = "fp32", opset: int = 23, max_seq_len: int | None = None,
           validate: bool = True, force: bool = False, progress: Progress = SILENT) -> dict:
    """Export a GLM checkpoint; returns the contents of export.json."""

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if opset not in IR_VERSION:
        raise UsageError(f"--opset {opset}: supported opsets are {min(IR_VERSION)}..{max(IR_VERSION)}")
    started = time.perf_counter()
    ckpt = open_checkpoint(model)
    c = ckpt.config
    max_seq_len = c.max_position_embeddings if max_seq_len is None else max_seq_len
    if not 0 < max_seq_len <= c.max_position_embeddings:
        raise UsageError(f"--max-seq-len {max_seq_len}: must be between 1 and the model's "
                         f"max_position_embeddings ({c.max_position_embeddings})")
    if validate and dtype != "bf16":
        check_memory(ckpt.num_parameters)
    with atomic_dir(out_dir, force=force) as tmp:
        graph = build_decoder(c, ckpt.specs, _loader(ckpt, dtype), dtype=dtype, opset=opset)
        _save(graph, tmp, progress)
        del graph
        for f in ckpt.sidecar_files():
            shutil.copy2(f, tmp / f.name)
        validation = {"status": "skipped", "reason": "--no-validate"}
        if validate:
            with progress.step("validating against transformers"):
                validation = run_validation(ckpt, tmp / ONNX_FILE, dtype)
        meta = _metadata(ckpt, tmp, dtype, opset, max_seq_len, validation, progress)
        meta["export_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _loader(ckpt: Checkpoint, dtype: str):
    """A weight in the export dtype (the router's in fp32); linear layers transposed to [in, out] for MatMul."""
    import torch
    from onnx_ir.tensor_adapters import TorchTensor

    to = getattr(torch, FLOATS[dtype].numpy)

    def load(spec: WeightSpec):
        t = ckpt.load_weight(spec).to(torch.float32 if spec.fp32 else to)
        return TorchTensor(t.transpose(-1, -2).contiguous() if spec.linear else t, name=spec.name)

    return load


def _save(graph, tmp: Path, progress: Progress) -> None:
    import onnx_ir as ir

    with progress.step("writing weights", total=len(graph.graph.initializers)) as step:
        written = 0

        def advance(tensor, info):
            nonlocal written
            written += 1
            progress.update(step, completed=written)

        ir.save(graph, tmp / ONNX_FILE, external_data=DATA_FILE, callback=advance, max_in_flight_bytes=256 << 20)


def _latent_cache(c, dtype: str) -> dict:
    """What an MLA cache holds per token (all layers) against the expanded per-head keys and values."""
    a, size = c.mla, FLOATS[dtype].bytes
    latent = c.num_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * size
    expanded = c.num_layers * c.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * size
    return {"holds": "the normalized latent (key) and the rotated key (value) of each layer",
            "bytes_per_token": latent, "expanded_kv_bytes_per_token": expanded}


def _metadata(ckpt: Checkpoint, tmp: Path, dtype: str, opset: int, max_seq_len: int, validation: dict,
              progress: Progress) -> dict:
    inputs, outputs = io_spec(ckpt.config, dtype)
    with progress.step("hashing source and outputs"):
        source_files = {str(f.relative_to(ckpt.path)): sha256(f) for f in
                        [ckpt.path / "config.json", *ckpt.files]}
        outputs_hash = {name: sha256(tmp / name) for name in (ONNX_FILE, DATA_FILE)}
    return {
        "format_version": FORMAT_VERSION,
        "family": ckpt.config.family,
        "config": ckpt.config.to_dict(),
        "parameters": ckpt.num_parameters,
        "dtype": dtype,
        "opset": opset,
        "ir_version": IR_VERSION[opset],
        "max_seq_len": max_seq_len,
        "weight_layout": "linear weights stored transposed ([in, out]) under their checkpoint names",
        "io": {"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs]},
        "files": {"onnx": ONNX_FILE, "data": DATA_FILE, "sha256": outputs_hash,
                  "sidecars": sorted(f.name for f in ckpt.sidecar_files())},
        "source": {"model": ckpt.source, "path": str(ckpt.path), "sha256": source_files},
        **({"moe": {"experts": ckpt.config.moe.num_experts, "top_k": ckpt.config.moe.top_k,
                    "active_parameters": ckpt.num_active_parameters}} if ckpt.config.moe else {}),
        **({"kv_cache": _latent_cache(ckpt.config, dtype)} if ckpt.config.mla else {}),
        "skipped_tensors": {"count": len(ckpt.skipped), "reason": (
            f"the {ckpt.config.mtp_layers} multi-token-prediction layer(s) after the decoder's "
            f"{ckpt.config.num_layers} (speculative decoding, not run by the decoder)") if ckpt.skipped else None},
        "validation": validation,
        "tools": tool_versions(),
        "host": platform.node(),
    }


