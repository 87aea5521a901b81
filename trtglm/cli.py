"""The `trtglm` command line. Thin commands: parse, call one library function, print.

One error boundary: a TrtglmError prints one line (plus a hint) and exits non-zero; anything else
is a bug and also prints one line, unless --debug asks for the traceback.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import TrtglmError


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _console()
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)


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
@click.option("--json", "as_json", is_flag=True, help="Print export.json to stdout.")
def export_cmd(model, out_dir, dtype, opset, max_seq_len, no_validate, force, as_json):
    """Export MODEL (a local HF checkpoint directory or a hub id) to ONNX with a KV cache."""
    from .export import export

    with _progress() as progress:
        meta = export(model, out_dir, dtype=dtype, opset=opset, max_seq_len=max_seq_len,
                      validate=not no_validate, force=force, progress=progress)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    v = meta["validation"]
    check = (f"max |logits diff| {v['max_abs_diff']:.2e} (tolerance {v['tolerance']:g}), "
             f"argmax agreement {v['argmax_agreement']:.0%}" if v["status"] == "passed"
             else f"skipped: {v['reason']}")
    c = meta["config"]
    click.echo(f"exported {meta['family']} ({meta['parameters'] / 1e6:.1f}M parameters, {c['num_layers']} layers, "
               f"{dtype}, opset {opset}) to {out_dir} in {meta['export_seconds']:.1f} s")
    click.echo(f"validation: {check}")


@cli.command("build")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Build directory (must not exist unless --force).")
@click.option("--onnx-only", is_flag=True, help="Stop after the graph work: write BUILD_DIR/model.onnx.")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Fail unless every rule fused as often as the model needs (--no-strict for foreign graphs).")
@click.option("--fusions", default="rms_norm,rotary,attention", show_default=True,
              help="Comma-separated fusions to apply: rms_norm, rotary, rotary_keys (also keys; TensorRT-RTX "
                   "cannot build it with fused attention), attention; 'none' for no fusion.")
@click.option("--max-seq-len", type=int, default=None,
              help="Rotary table length. [default: the export's max_seq_len]")
@click.option("--force", is_flag=True, help="Replace BUILD_DIR if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print manifest.json to stdout.")
def build_cmd(export_dir, out_dir, onnx_only, strict, fusions, max_seq_len, force, as_json):
    """Fuse (and, with the engine step, build) the graph of a `trtglm export` directory."""
    from .build import build

    manifest = build(export_dir, out_dir, onnx_only=onnx_only, strict=strict, max_seq_len=max_seq_len,
                     fusions=frozenset() if fusions == "none" else frozenset(filter(None, fusions.split(","))),
                     force=force)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    f = manifest["fusion"]
    click.echo(f"fused graph written to {out_dir}: {f['nodes_before']} -> {f['nodes_after']} nodes "
               f"({f['nodes_after'] / f['nodes_before']:.0%})")
    for kind, n in f["fused"].items():
        want = (f["expected"] or {}).get(kind)
        click.echo(f"  {kind:<10} {n:>4}" + (f"  (expected {want})" if want is not None else ""))


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="trtglm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("trtglm: interrupted", err=True)
        sys.exit(130)
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
        click.echo("trtglm: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        click.echo(f"trtglm: internal error: {type(e).__name__}: {e} (re-run with --debug for the traceback)",
                   err=True)
        sys.exit(70)
