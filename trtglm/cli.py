"""The `trtglm` command line. Thin commands: parse, call one library function, print.

One error boundary: a TrtglmError prints one line (plus a hint) and exits non-zero; anything else
is a bug and also prints one line, unless --debug asks for the traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from contextlib import closing
from pathlib import Path

import click

from . import __version__
from .core.errors import TrtglmError
from .core.progress import Progress


def _console():
    from rich.console import Console

    return Console(stderr=True)


class _RichProgress(Progress):
    """The library's progress steps as rich progress bars on stderr (nothing when stderr is not a terminal)."""

    def __init__(self, bars):
        self._bars = bars

    def start(self, description: str, total: int | None = None) -> int:
        return self._bars.add_task(description, total=total)

    def update(self, step: int, *, completed: int | None = None, total: int | None = None,
               description: str | None = None) -> None:
        changes = {"completed": completed, "total": total, "description": description}
        self._bars.update(step, **{k: v for k, v in changes.items() if v is not None})

    def finish(self, step: int) -> None:
        self._bars.remove_task(step)

    def note(self, text: str) -> None:
        self._bars.console.print(text)


@contextlib.contextmanager
def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as Bars

    console = _console()
    with Bars(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
              TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bars:
        yield _RichProgress(bars)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON for machines.")


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trtglm")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Turn GLM language models into TensorRT engines: export, build, run."""
    ctx.obj = {"debug": debug}


@cli.command("export")
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (must not exist unless --force).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Weight and compute dtype of the exported graph.")
@click.option("--opset", type=int, default=23, show_default=True, help="ONNX opset (18-24).")
@click.option("--max-seq-len", type=int, default=None,
              help="Longest sequence (past + new tokens) later stages plan for. [default: the model's maximum]")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs transformers logits check.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@json_option
def export_cmd(model, out_dir, dtype, opset, max_seq_len, no_validate, force, as_json):
    """Export MODEL (a local HF checkpoint directory or a hub id) to ONNX with a KV cache."""
    from .export.exporter import export

    with _progress() as progress:
        meta = export(model, out_dir, dtype=dtype, opset=opset, max_seq_len=max_seq_len,
                      validate=not no_validate, force=force, progress=progress)
    if as_json:
        _echo_json(meta)
        return
    v = meta["validation"]
    check = (f"max |logits diff| {v['max_abs_diff']:.2e} (tolerance {v['tolerance']:g}), "
             f"argmax agreement {v['argmax_agreement']:.0%}" if v["status"] == "passed"
             else f"skipped: {v['reason']}")
    c = meta["config"]
    click.echo(f"exported {meta['family']} ({meta['parameters'] / 1e6:.1f}M parameters, {c['num_layers']} layers, "
               f"{dtype}, opset {opset}) to {out_dir} in {meta['export_seconds']:.1f} s")
    click.echo(f"validation: {check}")
    if meta.get("moe"):
        m = meta["moe"]
        click.echo(f"experts: {m['experts']} routed, top-{m['top_k']}: {m['active_parameters'] / 1e6:.1f}M "
                   "parameters per token")
    if meta.get("kv_cache"):
        k = meta["kv_cache"]
        click.echo(f"KV cache: {k['bytes_per_token'] / 1024:.1f} KiB per token (latent and rotary key), against "
                   f"{k['expanded_kv_bytes_per_token'] / 1024:.1f} KiB expanded")
    if (meta.get("skipped_tensors") or {}).get("count"):
        click.echo(f"skipped {meta['skipped_tensors']['count']} tensors: {meta['skipped_tensors']['reason']}")


# `trtglm build` flags that set a recipe field: type, choices and help come from the schema (core/recipe.py).
BUILD_FLAGS = {
    "--target": "builder.targets", "--backend": "builder.backend", "--attention": "builder.attention",
    "--max-batch": "shapes.max_batch", "--max-input-len": "shapes.max_input_len",
    "--max-seq-len": "shapes.max_seq_len", "--logits": "shapes.logits", "--kv-cache": "shapes.kv_cache",
    "--fusions": "fusion.fusions", "--strict/--no-strict": "fusion.strict",
    "--calib-data": "calibration.data", "--calib-samples": "calibration.samples",
    "--calib-seq-len": "calibration.seq_len", "--calib-method": "calibration.method",
    "--gate/--no-gate": "accuracy.gate", "--max-memory": "builder.max_memory",
}
# Set in a recipe only: everything a recipe can say that has no flag (tests/test_cli.py checks the two lists
# cover the schema, so a new field cannot be forgotten).
RECIPE_ONLY = {
    "model.name", "model.source", "precision.fp32_ops", "precision.logits_dtype", "precision.quantization.block_size",
    "precision.quantization.lm_head", "shapes.opt_batch", "shapes.opt_input_len", "shapes.profiles",
    "builder.optimization_level", "builder.workspace_mb", "builder.tactic_shared_memory_kb", "builder.timing_cache",
    "builder.tiling_level", "builder.max_aux_streams", "builder.weight_streaming", "builder.profiling_verbosity",
    "accuracy.max_ppl_delta", "accuracy.min_next_token_agreement", "accuracy.min_logits_cosine", "accuracy.data",
    "accuracy.samples", "accuracy.seq_len",
}


def _recipe_options(command):
    """Decorate `command` with one option per BUILD_FLAGS entry, each storing into `recipe__<section>__<field>`."""
    import typing

    from .core.recipe import recipe_field

    for flag, path in reversed(BUILD_FLAGS.items()):
        field = recipe_field(path)
        kind = field.annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        literal = args[0] if args and typing.get_origin(args[0]) is typing.Literal else kind
        options: dict = {}
        if typing.get_origin(kind) is tuple:
            options["type"] = str  # comma-separated
        elif typing.get_origin(literal) is typing.Literal:
            options["type"] = click.Choice([str(a) for a in typing.get_args(literal)])
        elif kind is int or int in args:
            options["type"] = int
        elif kind is not bool:
            options["type"] = str
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        shown = ",".join(default) if isinstance(default, list) else default
        items = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None
        if typing.get_origin(items) is typing.Literal:
            shown = f"{shown}; comma-separated from {', '.join(typing.get_args(items))}, or none"
        help_text = f"{field.description[0].upper()}{field.description[1:]}. [recipe: {path}; default: {shown}]"
        command = click.option(flag, "recipe__" + path.replace(".", "__"), default=None, help=help_text,
                               **options)(command)
    return command


def _recipe_overrides(options: dict) -> dict:
    """{section: {field: value}} from the recipe__ options the user gave (None: not given)."""
    overrides: dict = {}
    for key, value in options.items():
        section, name = key.removeprefix("recipe__").split("__", 1)
        if name == "fusions" and value is not None:
            value = () if value == "none" else tuple(f for f in value.split(",") if f)
        overrides.setdefault(section, {})[name] = value
    return overrides


@cli.command("build")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Build directory (must not exist unless --force).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe; flags below override it.")
@click.option("--fp32", "dtype", flag_value="fp32", help="Precision (default: as exported).")
@click.option("--fp16", "dtype", flag_value="fp16")
@click.option("--bf16", "dtype", flag_value="bf16")
@click.option("--int8", "dtype", flag_value="int8")
@click.option("--int4", "dtype", flag_value="int4")
@click.option("--fp8", "dtype", flag_value="fp8")
@click.option("--onnx-only", is_flag=True, help="Stop after the graph work: write BUILD_DIR/model.onnx.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False), default=None,
              help="fp32 export the gate compares with. [default: EXPORT_DIR when it is fp32]")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Engine cache. [default: ~/.cache/trtglm/engines]")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the engine cache.")
@click.option("--force", is_flag=True, help="Replace BUILD_DIR if it exists.")
@_recipe_options
@json_option
def build_cmd(export_dir, out_dir, recipe, dtype, onnx_only, reference, cache_dir, no_cache, force, as_json,
              **recipe_flags):
    """Fuse the graph of a `trtglm export` directory and build a TensorRT engine from it."""

    from .engine.build import build
    from .engine.inspect import graph_of

    overrides = _recipe_overrides(recipe_flags)
    overrides.setdefault("precision", {})["dtype"] = dtype
    with _progress() as progress:
        manifest = build(export_dir, out_dir, recipe=recipe, overrides=overrides, onnx_only=onnx_only,
                         cache_dir=Path(cache_dir) if cache_dir else None, use_cache=not no_cache, force=force,
                         reference=reference, progress=progress)
    if as_json:
        _echo_json(manifest)
        return
    f = manifest["fusion"]
    click.echo(f"fused graph: {f['nodes_before']} -> {f['nodes_after']} nodes "
               f"({f['nodes_after'] / f['nodes_before']:.0%}); "
               + ", ".join(f"{kind} {n}" + (f"/{f['expected'][kind]}" if f["expected"] else "")
                           for kind, n in f["fused"].items()))
    click.echo(_graph_line(graph_of(manifest)))
    for line in _precision_lines(manifest) + _stage_lines(manifest):
        click.echo(line)
    if manifest["stage"] == "engine":
        e, c = manifest["engine"], manifest["cache"]
        how = "cache hit" if c.get("hit") else f"built in {e['tensorrt_build_seconds']:.1f} s"
        click.echo(f"engine: {manifest['backend']['name']} {manifest['backend']['version']}, "
                   f"{', '.join(manifest['targets'])}, {manifest['precision']['dtype']}, "
                   f"{e['bytes'] / 1e6:.1f} MB, {e['kernels']} kernels ({how}), {_attention(manifest)}")
    click.echo(f"written to {out_dir}")


def _attention(m: dict) -> str:
    g = m.get("engine_graph") or {"attention": "layer"}
    return (f"attention {g['attention']} for Myelin ({g['file']})" if g["attention"] != "layer"
            else "attention as TensorRT's attention layer")


def _stage_lines(m: dict) -> list[str]:
    """A staged build's stages: layers, weights and (built) the engine and its build's peak memory."""
    stages, plan = m.get("stages"), m.get("stage_plan")
    if not stages:
        return []
    lines = [f"stages: {len(stages)} within a budget of {plan['budget_bytes'] / 2**30:.2f} GiB (estimated build "
             f"peak {plan['estimated_peak_bytes'] / 2**30:.2f} GiB)"]
    graph = [v for s in stages for v in (s.get("graph_peak_rss_bytes") or {}).values() if v]
    if graph:
        lines.append(f"  cut, fusion and precision, stage by stage in the build process: peak {max(graph) / 2**30:.2f} GiB")
    for s in stages:
        first, end = s["layers"]
        engine = s.get("engine")
        lines.append(f"  stage {s['index']}: layers {first}-{end - 1}, weights {s['weight_bytes'] / 1e6:.1f} MB"
                     + (f", engine {engine['bytes'] / 1e6:.1f} MB built at a peak of "
                        f"{engine['peak_rss_bytes'] / 2**30:.2f} GiB" if engine else ""))
    return lines


def _graph_line(g: dict) -> str:
    return (f"graph: logits of {'every position' if g['logits'] == 'all' else 'the last position'}, "
            + (f"static KV cache of {g['max_seq_len']} slots" if g["kv_cache"] == "static" else "dynamic KV cache"))


def _precision_lines(m: dict) -> list[str]:
    """What the precision stage did and what the gate measured (build output and `inspect`)."""
    p, c, lines = m["precision"], m.get("calibration"), []
    if "from" in p:
        islands = p["fp32_islands"]["overflowing_nodes"]
        lines.append(f"precision: {p['from']} -> {p['dtype']}"
                     + (f", {p['quantized_nodes']} linear layers quantized" if "quantized_nodes" in p else "")
                     + (f" and {p['experts']['parameters'] / 1e6:.1f}M expert weights ({p['experts']['stacked_weights']}"
                        " stacks, weight-only)" if "experts" in p else "")
                     + (f", router fp32 ({p['fp32_islands']['router_nodes']} nodes)"
                        if p["fp32_islands"].get("router_nodes") else "")
                     + (f", {len(islands)} fp32 islands from calibrated ranges" if islands else "")
                     + (f", calibrated on {c['samples']} x {c['seq_len']} tokens ({c['method']})" if c else "")
                     + (f"; fp16 range check {p['range_check']}" if "range_check" in p else ""))
    if m.get("accuracy"):
        a = m["accuracy"]
        lines.append(f"accuracy gate passed: perplexity {a['perplexity_delta']:+.2%}, next-token agreement "
                     f"{a['next_token_agreement']:.1%}, logits cosine {a['logits_cosine']:.5f}")
    return lines


@cli.command("inspect")
@click.argument("path", type=click.Path())
@json_option
def inspect_cmd(path, as_json):
    """Describe an ONNX file, an engine, an export or a build directory."""
    from .engine.inspect import inspect_path

    info = inspect_path(path)
    if as_json:
        _echo_json(info)
        return
    for line in _summary(info):
        click.echo(line)


def _summary(info: dict) -> list[str]:
    """A few lines for people; --json has everything."""
    def io_lines(io):
        return [f"  {t['name']}: {t['dtype']} {t['shape']}" for t in io[:4]] + (
            [f"  ... and {len(io) - 4} more"] if len(io) > 4 else [])

    if info["kind"] in ("onnx", "export"):
        o = info["onnx"]
        ops = ", ".join(f"{k} {v}" for k, v in list(o["ops"].items())[:8])
        return [f"ONNX, opset {o['opset']}, {o['nodes']} nodes: {ops}",
                f"initializers: {o['initializer_dtypes']}", "inputs:", *io_lines(o["inputs"]),
                "outputs:", *io_lines(o["outputs"])]
    if info["kind"] == "engine":
        e = info["engine"]
        r = e["runtime"]
        return [f"engine, {e['bytes'] / 1e6:.1f} MB, sha256 {e['sha256'][:16]}..., built by {e.get('backend')} "
                f"for {e.get('targets')}", "load check: " + ("ok" if r.get("ok") else r["reason"])]
    g = info["graph"]
    lines = [f"build ({info['stage']}): {info['precision']['dtype']}, fusion {info['fusion']['fused']}, "
             f"nodes {info['fusion']['nodes_before']} -> {info['fusion']['nodes_after']}",
             _graph_line(g), *_precision_lines(info), *_stage_lines(info)]
    if info.get("engine"):
        e = info["engine"]
        lines.append(f"engine: {info['backend']['name']} {info['backend']['version']} for {', '.join(info['targets'])}, "
                     f"{e['bytes'] / 1e6:.1f} MB, {e['kernels']} kernels, {e['network_layers']} network layers, "
                     + _attention(info))
        lines.append("engine layer types: " + ", ".join(f"{k} {v}" for k, v in info.get("engine_layer_types", {}).items()))
        if info.get("gemm_datatypes"):
            lines.append("GEMMs (activations x weights): "
                         + ", ".join(f"{k}: {v}" for k, v in info["gemm_datatypes"].items()))
        for name, profile in info["profiles"].items():
            ids = profile["input_ids"]
            past = next((v for k, v in profile.items() if k.startswith("past_key_values.")), None)
            lines.append(f"profile {name}: input_ids min/opt/max {ids}" + (f", past {[p[2] for p in past]}" if past else ""))
        est = info["estimate"]
        lines.append(f"memory estimate: weights {est['weights_bytes'] / 1e6:.1f} MB, KV cache "
                     f"{est['kv_cache_bytes'] / 1e6:.1f} MB, activations {est['activation_bytes'] / 1e6:.1f} MB")
    return lines


@cli.command("verify")
@click.argument("build_dir", type=click.Path())
@json_option
def verify_cmd(build_dir, as_json):
    """Check a build directory: file hashes against the manifest, and (with a GPU) that the engine loads here."""
    from .engine.inspect import verify

    result = verify(build_dir)
    if as_json:
        _echo_json(result)
        return
    engine = result.get("engine")
    click.echo(f"{build_dir}: hashes match the manifest ({', '.join(result['files'])})")
    if engine:
        click.echo("engine: " + ("loads on this GPU" if engine.get("ok") else f"not loaded ({engine['reason']})"))


@cli.command("pack")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(), required=True, help="The pack's directory.")
@click.option("--for", "target", type=click.Choice(["gpu", "cpu"]), required=True,
              help="gpu: the engines (the TensorRT runner); cpu: the ONNX graphs (ONNX Runtime).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@json_option
def pack_cmd(build_dir, out_dir, target, force, as_json):
    """What one runtime needs from a build directory, its weights once (hard links where possible)."""
    from .engine.pack import pack

    manifest = pack(build_dir, out_dir, target, force=force)
    if as_json:
        _echo_json(manifest)
        return
    files = manifest["files"]["sha256"]
    size = sum((Path(out_dir) / name).stat().st_size for name in files)
    click.echo(f"{out_dir}: packed for {target} ({len(files)} files, {size / 1e6:.1f} MB): runs on "
               f"{manifest['packed']['runs_on']}")


def _sampling_options(f):
    for option in reversed([
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=int, default=0, show_default=True),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Makes sampling reproducible."),
    ]):
        f = option(f)
    return f


def _parse_devices(ctx, param, value):
    if value is None:
        return None
    try:
        devices = [int(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: CUDA device numbers separated by commas, such as 0,1") from None
    if any(d < 0 for d in devices):
        raise click.BadParameter(f"{value!r}: device numbers start at 0")
    return devices


_devices_option = click.option(
    "--devices", callback=_parse_devices, default=None, metavar="0,1",
    help="CUDA devices for the TensorRT engines (default: 0): a staged build's stages are spread over them, "
         "consecutive stages per device, the hidden states copied between devices where stages meet.")

_cuda_graphs_option = click.option(
    "--cuda-graphs", is_flag=True,
    help="Capture decode steps as CUDA graphs and replay them (a static-cache build: every decode step has the "
         "same shapes): one launch per step. TensorRT-RTX engines, or ONNX Runtime's CUDA provider.")


@cli.command("run")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for a left-padded batch).")
@click.option("--input-file", type=click.Path(exists=True, dir_okay=False), help="One prompt per line.")
@click.option("--chat", is_flag=True, help="Chat on the terminal with the model's chat template.")
@click.option("--prefix", default=None, help="Text put before every prompt; its KV cache is computed once.")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@_sampling_options
@click.option("--stream", is_flag=True, help="Print tokens as they come (first prompt).")
@_cuda_graphs_option
@_devices_option
@json_option
def run_cmd(build_dir, prompts, input_file, chat, prefix, backend, max_new_tokens, temperature, top_k, top_p,
            repetition_penalty, seed, stream, cuda_graphs, devices, as_json):
    """Generate text with a build: the TensorRT engine on a GPU, else ONNX Runtime over the same graph."""

    from .core.errors import UsageError
    from .model.tokenizer import load_text
    from .runtime.backends import open_backend
    from .runtime.generate import generate, make_prefix
    from .runtime.sampling import Sampling

    prompts = list(prompts)
    if input_file:
        try:
            prompts += [line for line in Path(input_file).read_text().splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UsageError(f"{input_file}: not UTF-8 text (--input-file takes one prompt per line)") from None
    if not prompts and not chat:
        raise UsageError("give --prompt, --input-file or --chat")
    try:
        sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    text = load_text(build_dir)
    model, why = open_backend(build_dir, backend, cuda_graphs=cuda_graphs, devices=devices)
    with closing(model):  # the engine keeps what TensorRT-RTX compiled for this GPU
        click.echo(f"backend: {why}", err=True)
        if chat:
            return _chat(model, text, sampling, max_new_tokens)
        shared = make_prefix(model, text.encode(prefix)) if prefix else None
        streamed: list[int] = []  # row 0's tokens so far; printed as the growth of their decoded text

        def on_token(row, token):
            if row == 0:
                before = text.decode(streamed)
                streamed.append(token)
                click.echo(text.decode(streamed)[len(before):], nl=False)

        result = generate(model, [text.encode(p) for p in prompts], max_new_tokens=max_new_tokens, sampling=sampling,
                          stop_ids=text.stop_ids, pad_id=text.pad_id, prefix=shared,
                          on_token=on_token if stream and not as_json else None)
        if stream and not as_json:
            click.echo()
        rows = [{"prompt": p, "completion": text.decode(t), "tokens": t, "finish": f}
                for p, t, f in zip(prompts, result.tokens, result.finish)]
        if as_json:
            _echo_json({"backend": model.name, "rows": rows, "prefill_ms": 1000 * result.prefill_seconds,
                        "decode_tokens_per_s": result.decode_tokens_per_second})
            return
        for r in rows[1 if stream else 0:]:
            click.echo(f"{r['prompt']}{r['completion']}")


def _chat(model, text, sampling, max_new_tokens):
    from .runtime.generate import generate

    messages = []
    click.echo("chat: an empty line or end of input ends it", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        out = []

        def on_token(row, token):
            out.append(token)

        reply = generate(model, [text.chat(messages)], max_new_tokens=max_new_tokens, sampling=sampling,
                         stop_ids=text.stop_ids, pad_id=text.pad_id, on_token=on_token)
        answer = text.decode(reply.tokens[0])
        click.echo(answer)
        messages.append({"role": "assistant", "content": answer})


@cli.command("bench")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--backend", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=64, show_default=True)
@_cuda_graphs_option
@_devices_option
@json_option
def bench_cmd(build_dir, backend, batch, input_len, output_len, cuda_graphs, devices, as_json):
    """Time to first token, decode tokens/s, p50/p99 per-token latency and peak memory (same JSON for every backend)."""
    from .runtime.backends import open_backend
    from .runtime.bench import run_bench

    model, why = open_backend(build_dir, backend, cuda_graphs=cuda_graphs, devices=devices)
    click.echo(f"backend: {why}", err=True)
    with closing(model):
        r = run_bench(model, batch=batch, input_len=input_len, output_len=output_len)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r['backend']}: batch {batch}, {input_len} in, {output_len} out: time to first token "
               f"{r['ttft_ms']:.1f} ms, decode {r['decode_tokens_per_s']:.1f} tok/s per sequence, per token "
               f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, peak RSS {r['peak_rss_mb']:.0f} MB")


@cli.command("serve")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together; more wait in the queue.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting to join; more are answered 429 with Retry-After.")
@click.option("--api-key", envvar="TRTGLM_API_KEY", default=None,
              help="Requests to /v1/ need 'Authorization: Bearer KEY' (also from $TRTGLM_API_KEY).")
@click.option("--model-name", default=None, help="The model's name in the API. [default: the build directory's name]")
@click.option("--prefix-cache-mb", type=click.IntRange(min=0), default=256, show_default=True,
              help="Host memory for the KV caches of earlier prompts that later prompts start with.")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
@json_option
def serve_cmd(build_dir, host, port, backend, max_batch, max_queue, api_key, model_name, prefix_cache_mb,
              access_log, as_json):
    """Serve a build over HTTP with OpenAI's API, requests batched as they come (until Ctrl-C)."""
    from .serve.scheduler import ServeOptions
    from .serve.server import Server, ServerSettings

    settings = ServerSettings(host, port, backend, api_key, model_name, access_log)
    options = ServeOptions(max_batch=max_batch, max_queue=max_queue, prefix_cache_bytes=prefix_cache_mb << 20)
    server = Server(build_dir, settings, options)
    with closing(server):
        ready = {"url": server.url, "model": server.served.model, "backend": server.backend_line,
                 "max_batch": max_batch, "max_queue": max_queue, "api_key": bool(api_key)}
        if as_json:
            click.echo(json.dumps(ready))
        else:
            click.echo(f"backend: {server.backend_line}", err=True)
            click.echo(f"serving {ready['model']} on {server.url}/v1 (OpenAI API; {server.url}/metrics, "
                       f"{server.url}/health); Ctrl-C stops", err=True)
        sys.stdout.flush()
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn has shut down gracefully and passes the signal on: a normal stop
            pass
    click.echo("trtglm serve: stopped", err=True)


@cli.command("eval")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--reference", type=click.Path(exists=True, file_okay=False),
              help="The fp32 export to compare with. [default: the build's source export]")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Held-out text, JSONL with a \"text\" field. [default: the shipped eval split]")
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Windows of --seq-len tokens.")
@click.option("--seq-len", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True)
@_devices_option
@json_option
def eval_cmd(build_dir, reference, data, samples, seq_len, backend, devices, as_json):
    """Accuracy of a build against its fp32 reference; exit 3 when outside the recipe's accuracy limits."""
    from .runtime.evaluate import GateFailed, evaluate

    r = evaluate(build_dir, reference, data, samples=samples, seq_len=seq_len, backend=backend, devices=devices)
    if as_json:
        _echo_json(r)
    else:
        click.echo(f"backend: {r['backend']}", err=True)
        click.echo(f"{r['tokens']} tokens: perplexity {r['candidate_perplexity']:.3f} vs reference "
                   f"{r['reference_perplexity']:.3f} ({r['perplexity_delta']:+.2%}), next-token agreement "
                   f"{r['next_token_agreement']:.1%}, logits cosine {r['logits_cosine']:.5f}")
    if not r["gate"]["passed"]:
        raise GateFailed("accuracy gate failed: " + "; ".join(r["gate"]["failures"]))


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    logging.basicConfig(format="trtglm: %(message)s", level=logging.WARNING)  # the library's warnings, one line each
    with _terminate_as_interrupt() as terminated:
        _main(argv, debug, terminated)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a CI job cancelled, `kill`) stops a command as Ctrl-C does: outputs in progress are removed."""
    import signal
    import threading

    terminated: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield terminated
        return

    def on_term(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None, debug: bool, terminated: list[int]) -> None:
    def interrupted():
        click.echo("trtglm: terminated" if terminated else "trtglm: interrupted", err=True)
        sys.exit(143 if terminated else 130)

    try:
        cli.main(args=argv, prog_name="trtglm", standalone_mode=False)
    except click.exceptions.Abort:
        interrupted()
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except TrtglmError as e:
        if debug:
            raise
        click.echo(f"trtglm: error: {e}", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        interrupted()
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        click.echo(f"trtglm: internal error: {type(e).__name__}: {e} (re-run with --debug for the traceback)",
                   err=True)
        sys.exit(70)
