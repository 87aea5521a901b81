"""Fusion benchmark on a random-weight GLM-4-shaped model of about 136M parameters.

    python bench/fusion.py [--workdir .bench] [--layers 12] [--rounds 3]

One run measures, side by side:
- TensorRT-RTX fp16 engines for SM89 (built on the CPU) of the plain export and of the fused graphs:
  network layers, engine kernels per decoder layer with one profile (what `trtglm build` makes by
  default: one kernel list serves prefill and decode, built from engine.onnx, attention decomposed
  for Myelin; grouped, `builder.attention: grouped`; and from the Attention op as it is, TensorRT's
  attention layer) and with split
  profiles (`shapes.profiles: split`, attention layer: a prefill and a decode profile, each its own
  kernels and its own copy of the weights),
  whether the fused attention (mha) kernel is there, and the kernel lists of one layer;
- ONNX Runtime CPU (fp32): prefill latency at 512 tokens and decode tokens/s at 1024 tokens of
  context, plain vs fused, the graphs measured in turn over three rounds (ratios: the median over rounds
  of each round's plain/fused). Rows: the default build (dynamic KV cache, keys' rotation folded into
  their projection, the lm_head and the last layer on the last position only, as generation needs),
  `--logits all` (the lm_head on every position, as perplexity needs), `--kv-cache static` (2048 slots updated in place, keys
  rotated by RotaryEmbedding, or folded) and fusion variants;
- node counts before and after fusion.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from trtglm.core.recipe import ShapesSection
from trtglm.engine.build import build
from trtglm.engine.builder import build_engine, make_profiles
from trtglm.engine.engine_graph import write_engine_graph
from trtglm.export.exporter import export
from trtglm.fusion import DEFAULT_FUSIONS
from trtglm.model.synthetic import glm4_config, write_random_checkpoint
from trtglm.runtime.backends import OrtBackend

STATIC = {"kv_cache": "static"}
DEFAULT = "fused (default)"
# label -> (fusions, None for the build's default; shapes overrides); the plain export is not built
ROWS = {
    "plain export": None,
    DEFAULT: (None, {}),
    "fused, every position's logits": (None, {"logits": "all"}),  # the lm_head on every row (eval needs it)
    "static KV cache (keys by RotaryEmbedding)": (None, STATIC),  # its default fusions
    "static KV cache, keys folded": (DEFAULT_FUSIONS, STATIC),
    "default, key rotation unfolded": (DEFAULT_FUSIONS - {"rotary_keys_folded"}, {}),
    "default without qkv": (DEFAULT_FUSIONS - {"qkv"}, {}),
    "default, keys by RotaryEmbedding": (DEFAULT_FUSIONS - {"rotary_keys_folded"} | {"rotary_keys"}, {}),
    "norms + qkv + rotary, no attention": (frozenset({"rms_norm", "qkv", "rotary", "rotary_keys"}), {}),
}


def kernels_by_profile(engine) -> dict[str, list[str]]:
    """Kernel names grouped by the Myelin graph they belong to, one per optimization profile."""
    groups = defaultdict(list)
    for k in engine.kernels:
        m = re.search(r"_myl(\d+)_\d+$", k["name"])
        groups[m.group(1) if m else "other"].append(k["name"])
    ordered = [groups[key] for key in sorted(k for k in groups if k != "other")]
    return {"prefill": ordered[0] if ordered else [], "decode": ordered[1] if len(ordered) > 1 else [],
            "other": groups.get("other", [])}


def ort_timings(paths: dict[str, Path], vocab: int, prefill: int = 512, context: int = 1024, decode: int = 16,
                rounds: int = 3) -> dict[str, dict]:
    """Every graph measured in turn, `rounds` times over (this shared machine's speed drifts by 20-30% within
    minutes, so ratios come from interleaved measurements): best prefill, median decode step, and the speed-ups
    over the first graph (the plain export) as the median over rounds of each round's ratio."""
    sessions = {label: OrtBackend(path) for label, path in paths.items()}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (1, max(prefill, context)))
    caches = {label: dec.forward(ids[:, :context], np.ones((1, context), np.int64), np.arange(context)[None],
                                 dec.new_cache(1))[1] for label, dec in sessions.items()}
    pre, steps = defaultdict(list), defaultdict(list)  # per round: prefill seconds, median decode step seconds
    for _ in range(rounds):
        for label, dec in sessions.items():
            t = time.perf_counter()
            dec.forward(ids[:, :prefill], np.ones((1, prefill), np.int64), np.arange(prefill)[None], dec.new_cache(1))
            pre[label].append(time.perf_counter() - t)
            step = []
            for _ in range(decode):  # always one token onto the same 1024-token cache
                t = time.perf_counter()
                dec.forward(ids[:, :1], np.ones((1, context + 1), np.int64), np.array([[context]]), caches[label])
                step.append(time.perf_counter() - t)
            steps[label].append(statistics.median(step))
    base = next(iter(sessions))
    return {label: {"prefill_512_ms": 1000 * min(pre[label]), "decode_tok_s_at_1024": 1 / statistics.median(steps[label]),
                    "prefill_x": statistics.median(b / t for b, t in zip(pre[base], pre[label])),
                    "decode_x": statistics.median(b / t for b, t in zip(steps[base], steps[label]))}
            for label in sessions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="ONNX Runtime rounds, every graph timed in turn in each")
    args = ap.parse_args()
    work = Path(args.workdir) / "fusion"
    shutil.rmtree(work, ignore_errors=True)
    config = glm4_config(hidden=768, layers=args.layers, heads=12, kv_heads=2, intermediate=2560, vocab=32000,
                         head_dim=64, max_positions=2048)
    ckpt = write_random_checkpoint(work / "ckpt", config, dtype="fp16")
    L = args.layers
    rows, fp32_graphs = {}, {}
    for dtype in ("fp16", "fp32"):
        export(str(ckpt), work / f"export-{dtype}", dtype=dtype, validate=False)
        for label, how in ROWS.items():
            path = work / f"export-{dtype}" / "model.onnx"
            row = rows.setdefault(label, {})
            if how is not None:
                fusions, shapes = how
                out = work / f"{dtype}-{re.sub(r'[^a-z0-9]+', '_', label.lower())}"
                manifest = build(work / f"export-{dtype}", out, onnx_only=True, overrides={"shapes": shapes},
                                 **({"fusions": fusions} if fusions is not None else {}))
                row["kv_cache"] = manifest["recipe"]["resolved"]["shapes"]["kv_cache"]
                path = out / "model.onnx"
                if dtype == "fp32":
                    row["nodes"] = f"{manifest['fusion']['nodes_before']} -> {manifest['fusion']['nodes_after']}"
            elif dtype == "fp32":
                import onnx

                row["nodes"] = str(len(onnx.load(path, load_external_data=False).graph.node))
            if dtype == "fp16":
                one = _one_profile(path, config)
                lowered = grouped = path
                if how is not None:  # what `trtglm build` builds one profile from (builder.attention: auto), and
                    # builder.attention: grouped (no repeated K/V); the graph itself where it has no Attention op
                    lowered, grouped = path.with_name("engine.onnx"), path.with_name("engine-grouped.onnx")
                    if not write_engine_graph(path, lowered)["decomposed"]:
                        lowered = path
                    if not write_engine_graph(path, grouped, "grouped")["decomposed"]:
                        grouped = path
                built = {p: _try_build(p, one) for p in {lowered, path, grouped}}  # each graph once
                single, layer, grouped = built[lowered], built[path], built[grouped]
                engine = _try_build(path, None)  # split profiles
                prof = kernels_by_profile(engine) if not isinstance(engine, str) else {"prefill": [], "decode": []}
                row["engine"] = {
                    "network_layers": getattr(single, "network_layers", None),
                    "kernels_per_layer_one_profile": _per_layer(single, L),
                    "kernels_per_layer_one_profile_attention_layer": _per_layer(layer, L),
                    "kernels_per_layer_one_profile_grouped": _per_layer(grouped, L),
                    "engine_mb_one_profile": round(len(single.plan) / 1e6, 1) if not isinstance(single, str) else None,
                    "kernels_per_layer_prefill": round(len(prof["prefill"]) / L, 2) if prof["prefill"] else engine,
                    "kernels_per_layer_decode": round(len(prof["decode"]) / L, 2) if prof["decode"] else engine,
                    "mha": any("mha" in k["name"] for e in (single, engine) if not isinstance(e, str) for k in e.kernels),
                    "engine_mb": round(len(engine.plan) / 1e6, 1) if not isinstance(engine, str) else None}
                row["decode_kernels_one_layer"] = _one_layer(prof["decode"], L)
                row["prefill_kernels_one_layer"] = _one_layer(prof["prefill"], L)
                if not isinstance(single, str):
                    row["one_profile_kernels_one_layer"] = _one_layer([k["name"] for k in single.kernels], L)
            else:
                fp32_graphs[label] = path
            print(json.dumps({label: row}), flush=True)
    for label, timings in ort_timings(fp32_graphs, config["vocab_size"], rounds=args.rounds).items():
        rows[label]["ort"] = timings
    _table(rows)


def _try_build(path: Path, profiles: list[dict] | None):
    """The engine (split profiles when `profiles` is None), or why TensorRT-RTX refused it."""
    try:
        return build_engine(path, targets=("sm89",), profiles=profiles, max_input_len=512, max_seq_len=2048)
    except Exception as e:  # noqa: BLE001 - a refused build is a result to report
        return "build fails (Myelin internal error)" if "Myelin" in str(e) else "build fails: " + str(e).splitlines()[0][:80]


def _per_layer(engine, layers: int):
    return engine if isinstance(engine, str) else round(len(engine.kernels) / layers, 2)


def _one_profile(path: Path, config: dict) -> list[dict]:
    """The profile `trtglm build` makes by default (shapes.profiles: single) for this graph's inputs."""
    import onnx

    names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
    cache = {n: (config["num_key_value_heads"], config["head_dim"]) for n in names if n.startswith("past_key_values.")}
    return make_profiles(names, cache, ShapesSection(max_batch=1, max_input_len=512, max_seq_len=2048))


def _one_layer(names: list[str], layers: int) -> list[str]:
    """The decode kernels of a middle layer: the repeating block between the first and last layers."""
    per = len(names) // layers
    start = (layers // 2) * per
    return [re.sub(r"_myl\d+_\d+$", "", n) for n in names[start:start + per]]


def _table(rows: dict) -> None:
    print("\n| graph | KV cache | nodes | TRT network layers | kernels/layer, one profile (default: attention "
          "decomposed) | one profile, grouped | one profile, attention layer | split: prefill | split: decode | "
          "mha kernel | ORT prefill 512 (ms) | ORT decode tok/s @1024 | vs plain (median of rounds) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        e = r.get("engine")
        eng = (f"{e['network_layers'] or ''} | {e['kernels_per_layer_one_profile']} | "
               f"{e['kernels_per_layer_one_profile_grouped']} | "
               f"{e['kernels_per_layer_one_profile_attention_layer']} | {e['kernels_per_layer_prefill']} | "
               f"{e['kernels_per_layer_decode']} | {'yes' if e['mha'] else 'no'}")
        o = r["ort"]
        print(f"| {label} | {r.get('kv_cache', 'dynamic')} | {r['nodes']} | {eng} | {o['prefill_512_ms']:.0f} | {o['decode_tok_s_at_1024']:.1f} | "
              f"prefill x{o['prefill_x']:.2f}, decode x{o['decode_x']:.2f} |")
    for label, phase in ((DEFAULT, "one_profile"), ("plain export", "one_profile"), (DEFAULT, "decode"),
                         ("static KV cache (keys by RotaryEmbedding)", "decode"), (DEFAULT, "prefill")):
        print(f"\n{phase.replace('_', ' ')} kernels of one layer ({label}):")
        for n in rows[label].get(f"{phase}_kernels_one_layer", []):
            print("  ", n)


if __name__ == "__main__":
    main()
