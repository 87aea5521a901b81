"""Mixture of experts on this CPU: a random glm4_moe of about 380M parameters (hidden 1024, 12 layers, 16 experts
of 512, top-4, one shared expert, the first layer dense) against its dense equivalent (the same parameters, every
MLP dense) and against transformers, and TensorRT-RTX kernels per layer.

    python bench/moe.py [--workdir .bench] [--prompt 32] [--new 32] [--rounds 3]

Prints, side by side in one run (rounds interleaved, medians):
- ONNX Runtime decode tok/s and time to first token (fp32 build, batch 1) of the MoE model in both forms (the
  graph's own gathered experts, which TensorRT builds, and ONNX Runtime's MoE op in their place, which the
  ONNX Runtime backend runs by default), of its dense equivalent, and transformers `generate` of the MoE model
  (fp32); the greedy tokens of both MoE forms equal transformers';
- weight bytes a decode step reads (the shared weights, the embedding's one row, the top-4 of each layer's 16
  experts) against the dense equivalent's (every weight);
- TensorRT-RTX (sm89, fp16) kernels per layer: engines of 2 and 3 layers of each shape (the MoE model, the same
  experts behind GLM-4.7-Flash's latent attention, the dense equivalent), the difference.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np

from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.model.config import normalize
from trtglm.model.synthetic import glm4_config, glm4_moe_config, glm4_moe_lite_config, write_random_checkpoint
from trtglm.model.weights import weight_specs
from trtglm.runtime.backends import OrtBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import arguments, interleaved, ort_runner, transformers_runner  # noqa: E402

WIDTHS = dict(hidden=1024, heads=16, kv_heads=2, head_dim=64, vocab=32000)
EXPERTS, TOP_K, EXPERT_WIDTH = 16, 4, 512


def moe_config(layers: int) -> dict:
    return glm4_moe_config(**WIDTHS, layers=layers, intermediate=4096, experts=EXPERTS, top_k=TOP_K,
                           expert_intermediate=EXPERT_WIDTH, max_positions=2048)


def lite_config(layers: int) -> dict:
    """The same experts behind multi-head latent attention (GLM-4.7-Flash's proportions at hidden 1024)."""
    return glm4_moe_lite_config(hidden=1024, layers=layers, heads=16, intermediate=4096, vocab=32000,
                                experts=EXPERTS, top_k=TOP_K, expert_intermediate=EXPERT_WIDTH, q_lora_rank=384,
                                kv_lora_rank=256, qk_nope=96, qk_rope=32, v_head=128, max_positions=2048)


def dense_config(layers: int) -> dict:
    """Every MLP as wide as a MoE layer's experts and shared expert together: the same parameters, all read."""
    return glm4_config(**WIDTHS, layers=layers, intermediate=(EXPERTS + 1) * EXPERT_WIDTH, max_positions=2048)


def read_per_token(config: dict) -> tuple[int, int]:
    """(parameters, parameters a one-token decode step reads): the embedding's one row, of the routed experts the
    top-k, everything else."""
    c = normalize(config)
    total = read = 0
    for role, spec in weight_specs(c).items():
        n = math.prod(spec.shape)
        total += n
        if role == "embed":
            n = spec.shape[1]
        elif role.endswith(("experts_gate_up", "experts_down")):
            n = n * c.moe.top_k // c.moe.num_experts
        read += n
    return total, read


def kernels_per_layer(work: Path, make, label: str) -> float:
    """TensorRT-RTX kernels of a 3-layer engine less those of a 2-layer one (fp16, sm89, a small vocabulary)."""
    counts = []
    for layers in (2, 3):
        root = work / f"{label}-{layers}"
        shutil.rmtree(root, ignore_errors=True)
        ckpt = write_random_checkpoint(root / "ckpt", {**make(layers), "vocab_size": 512}, dtype="fp16")
        export(str(ckpt), root / "e", dtype="fp16", validate=False, max_seq_len=256)
        m = build(root / "e", root / "b", overrides={
            "shapes": {"max_batch": 1, "max_input_len": 64, "max_seq_len": 256}, "builder": {"targets": "sm89"}})
        counts.append(m["engine"]["kernels"])
    return counts[1] - counts[0]


def main() -> None:
    args = arguments(__doc__, prompt=32, new=32)
    work = Path(args.workdir) / "moe"
    shutil.rmtree(work, ignore_errors=True)
    prompt = np.random.default_rng(0).integers(3, 32000, args.prompt).tolist()
    configs = {"MoE": moe_config(12), "dense equivalent": dense_config(12)}
    builds = {}
    for label, config in configs.items():
        root = work / label.split()[0]
        ckpt = write_random_checkpoint(root / "ckpt", {**config, "torch_dtype": "float32"}, dtype="fp32")
        export(str(ckpt), root / "e", validate=False, max_seq_len=2048)
        build(root / "e", root / "b", onnx_only=True)
        builds[label] = (ckpt, root / "b")
    runners = {"ONNX Runtime, MoE (fp32), MoE op": ort_runner(OrtBackend.from_build(builds["MoE"][1]), [prompt],
                                                              args.new),
               "ONNX Runtime, MoE (fp32), gathered form": ort_runner(
                   OrtBackend.from_build(builds["MoE"][1], moe_op=False), [prompt], args.new),
               "ONNX Runtime, dense equivalent (fp32)": ort_runner(
                   OrtBackend.from_build(builds["dense equivalent"][1]), [prompt], args.new),
               "transformers generate, MoE (fp32)": transformers_runner(builds["MoE"][0], prompt,
                                                                                       args.new)}
    results = interleaved(runners, args.rounds)
    reference = results["transformers generate, MoE (fp32)"]["tokens"]
    same = all(r["tokens"] == reference for label, r in results.items() if "MoE (fp32)," in label)
    sizes = {label: read_per_token(c) for label, c in configs.items()}
    print(f"\nprompt {args.prompt} tokens, {args.new} new, batch 1, median of {args.rounds} interleaved rounds; "
          f"MoE greedy tokens (both forms) equal transformers': {same}\n")
    print("| runner | parameters | read per decode token | decode tok/s | TTFT ms |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        total, read = sizes["dense equivalent" if "dense" in label else "MoE"]
        print(f"| {label} | {total / 1e6:.0f}M | {read * 4 / 1e6:.0f} MB | {r['decode_tok_s']:.1f} | "
              f"{r['ttft_ms']:.0f} |")
    moe, dense = results["ONNX Runtime, MoE (fp32), MoE op"], results["ONNX Runtime, dense equivalent (fp32)"]
    gathered = results["ONNX Runtime, MoE (fp32), gathered form"]
    print(f"\nbytes read per token, MoE / dense: {sizes['MoE'][1] / sizes['dense equivalent'][1]:.2f}; decode tok/s, "
          f"MoE op / dense: x{moe['decode_tok_s'] / dense['decode_tok_s']:.2f}, gathered form / dense: "
          f"x{gathered['decode_tok_s'] / dense['decode_tok_s']:.2f}; MoE op / gathered form: decode "
          f"x{moe['decode_tok_s'] / gathered['decode_tok_s']:.2f}, time to first token "
          f"x{moe['ttft_ms'] / gathered['ttft_ms']:.2f}; ONNX Runtime (MoE op) / transformers: "
          f"x{moe['decode_tok_s'] / results['transformers generate, MoE (fp32)']['decode_tok_s']:.2f}")
    print("\n| TensorRT-RTX 1.7, sm89, fp16 | kernels per layer |\n|---|---|")
    for label, make in (("MoE layer (16 experts, top-4, shared expert)", moe_config),
                        ("MoE layer with latent attention (glm4_moe_lite, written-out MLA)", lite_config),
                        ("dense layer (the dense equivalent)", dense_config)):
        print(f"| {label} | {kernels_per_layer(work, make, make.__name__)} |")
    if not same:
        raise SystemExit("the MoE build's greedy tokens differ from transformers'")


if __name__ == "__main__":
    main()
