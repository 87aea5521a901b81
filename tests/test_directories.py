"""ExportDir and BuildDir: the one reader of each output directory (file names, manifest, hashes)."""

import json

import pytest

from trtglm.core.errors import TrtglmError
from trtglm.core.files import sha256
from trtglm.engine.directory import BuildDir
from trtglm.export.directory import ExportDir


def _export(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    (tmp_path / "tokenizer.json").write_text("{}")
    io = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 8]}]}
    meta = {"format_version": 1, "family": "glm4", "dtype": "fp32", "max_seq_len": 64, "io": io,
            "config": {"num_layers": 2, "vocab_size": 8},
            "files": {"sha256": {n: sha256(tmp_path / n) for n in ("model.onnx", "model.onnx.data")},
                      "sidecars": ["tokenizer.json", "chat_template.jinja"]}}
    (tmp_path / "export.json").write_text(json.dumps(meta))
    return ExportDir(tmp_path)


def test_export_dir_reads_its_meta_once_and_checks_hashes(tmp_path):
    export = _export(tmp_path)
    assert export.dtype == "fp32" and export.data_bytes == len(b"weights")
    assert [f.name for f in export.sidecars()] == ["export.json", "tokenizer.json"]  # the missing one is skipped
    assert export.verify() == []
    (tmp_path / "export.json").unlink()
    assert export.dtype == "fp32"  # read once
    (tmp_path / "model.onnx.data").write_bytes(b"other")
    assert export.verify() == ["model.onnx.data does not match its sha256 in export.json"]
    assert export.require_fp32_reference() is export


def test_a_graph_without_export_json(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    export = ExportDir(tmp_path).require_graph()
    assert export.meta is None and export.sidecars() == []
    assert export.hashes() == {"model.onnx": sha256(tmp_path / "model.onnx")}
    with pytest.raises(TrtglmError, match="not a `trtglm export` directory"):
        ExportDir(tmp_path / "nothing").require_graph()


@pytest.mark.parametrize("text,message", [("{oops", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                                          (b"\xff\xfe", "not valid JSON")])
def test_corrupt_manifests_are_one_line(tmp_path, text, message):
    f = tmp_path / "manifest.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TrtglmError, match=message):
        BuildDir(tmp_path).manifest
    (tmp_path / "export.json").write_bytes(f.read_bytes())
    with pytest.raises(TrtglmError, match=message):
        ExportDir(tmp_path).meta


def test_build_dir_checks_every_listed_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    manifest = {"format_version": 1, "stage": "engine", "max_seq_len": 64, "precision": {"dtype": "fp16"},
                "fusion": {"fused": {}, "nodes_before": 10, "nodes_after": 5},
                "files": {"sha256": {"model.onnx": sha256(tmp_path / "model.onnx"), "model.engine": "0" * 64}},
                "recipe": {"resolved": {"shapes": {"kv_cache": "static"}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    build = BuildDir(tmp_path)
    assert BuildDir.is_build(tmp_path) and build.max_seq_len == 64 and build.shapes["kv_cache"] == "static"
    assert build.check_hashes() == ["model.engine is missing"]
    with pytest.raises(TrtglmError, match="no manifest.json"):
        BuildDir(tmp_path / "elsewhere").manifest


def test_edited_or_newer_manifests_name_the_field(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "stage": "engine", "max_seq_len": "64"}))
    with pytest.raises(TrtglmError, match=r"manifest.json: max_seq_len: Input should be a valid integer"):
        BuildDir(tmp_path).manifest
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 7, "stage": "engine"}))
    with pytest.raises(TrtglmError, match=r"manifest.json: written by a newer trtglm \(format 7; this one reads 1\)"):
        BuildDir(tmp_path).manifest
