"""The installed wheel, not the checkout: built with pip, installed into a venv of its own, and run from an
empty directory through export, an int8 build with the calibration text it ships, run and eval."""

import json
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_works_outside_the_checkout(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ROOT], check=True,
                   cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("trtglm-*.whl"))
    assert {"trtglm/data/calibration.jsonl", "trtglm/data/eval.jsonl"} <= set(zipfile.ZipFile(wheel).namelist())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "--no-deps", wheel], check=True)
    # its dependencies from this environment's site-packages, after its own (so the wheel's trtglm wins)
    own = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip())
    (own / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "empty"
    work.mkdir()

    def trtglm(*args: str) -> str:
        r = subprocess.run([venv / "bin" / "trtglm", *args], cwd=work, capture_output=True, text=True)
        assert r.returncode == 0, f"trtglm {' '.join(args)}: {r.stderr[-2000:]}"
        return r.stdout

    where = subprocess.run([python, "-c", "import trtglm; print(trtglm.__file__)"], cwd=work, capture_output=True,
                           text=True, check=True).stdout
    assert where.startswith(str(own)), where
    trtglm("export", str(ROOT / "models" / "tiny-glm4"), "-o", "e32", "--dtype", "fp32", "--no-validate")
    built = json.loads(trtglm("build", "e32", "-o", "b8", "--int8", "--onnx-only", "--logits", "all",
                              "--calib-samples", "8", "--calib-seq-len", "64", "--json"))
    assert built["precision"]["quantized_nodes"] > 0
    assert built["calibration"]["data"].startswith(str(own)), built["calibration"]  # the text the wheel ships
    ran = json.loads(trtglm("run", "b8", "--prompt", "In the beginning", "--max-new-tokens", "4", "--json"))
    assert len(ran["rows"][0]["tokens"]) == 4
    assert json.loads(trtglm("eval", "b8", "--samples", "2", "--seq-len", "64", "--json"))["candidate_perplexity"] > 1
