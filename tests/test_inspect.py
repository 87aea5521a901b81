import json

import pytest

from trtglm.cli import main
from trtglm.core.errors import TrtglmError
from trtglm.engine.build import build
from trtglm.engine.inspect import VerifyFailed, inspect_path, verify
from trtglm.export.exporter import export


@pytest.fixture(scope="module")
def built(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    export(str(checkpoints["glm4"]), root / "e", dtype="fp16", validate=False, max_seq_len=64)
    build(root / "e", root / "b", overrides={"shapes": {"max_input_len": 16, "max_seq_len": 64}}, use_cache=False)
    return root


def test_verify_passes_then_catches_tampering(built, tmp_path):
    import shutil

    result = verify(built / "b")
    assert result["hashes"] == "ok" and "model.engine" in result["files"]
    assert result["engine"]["checked"] is False and "GPU" in result["engine"]["reason"]
    copy = tmp_path / "b"
    shutil.copytree(built / "b", copy)
    with open(copy / "model.engine", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(VerifyFailed, match="model.engine does not match its sha256"):
        verify(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(VerifyFailed, match="model.onnx is missing"):
        verify(copy)
    with pytest.raises(VerifyFailed, match="no manifest.json"):
        verify(built / "e")


def test_inspect_every_kind(built):
    b = inspect_path(built / "b")
    assert b["kind"] == "build" and b["precision"]["dtype"] == "fp16" and set(b["profiles"]) == {"prefill+decode"}
    assert b["engine_layer_types"]["gemm"] > 0
    o = inspect_path(built / "b" / "model.onnx")
    assert o["onnx"]["ops"]["Attention"] == 2 and o["onnx"]["inputs"][0]["name"] == "input_ids"
    assert inspect_path(built / "e")["kind"] == "export"
    e = inspect_path(built / "b" / "model.engine")
    assert e["engine"]["targets"] == ["sm89"] and e["engine"]["runtime"]["checked"] is False
    with pytest.raises(TrtglmError, match="not an .onnx or .engine file"):
        inspect_path(built / "b" / "manifest.json")


def test_inspect_and_verify_cli(built, capsys):
    main(["inspect", str(built / "b")])
    out = capsys.readouterr().out
    assert "profile prefill+decode" in out and "memory estimate" in out
    assert "graph: logits of the last position, dynamic KV cache" in out
    assert "attention decomposed for Myelin (engine.onnx)" in out  # one profile: the engine's own graph
    main(["verify", str(built / "b"), "--json"])
    verified = json.loads(capsys.readouterr().out)
    assert verified["hashes"] == "ok" and "engine.onnx" in verified["files"]  # hashed like the other artifacts
    with pytest.raises(SystemExit) as e:
        main(["verify", str(built / "e")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no manifest.json" in err and "Traceback" not in err
