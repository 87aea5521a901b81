"""`make demo`: the main job end to end on a small GLM-4 model.

Until the project ships its small trained model, the demo writes a random-weight GLM-4 checkpoint
of about 7M parameters; then `trtglm export` (validated against transformers), `trtglm build`
(fusion + fp16 TensorRT engine for RTX GPUs, built on this CPU with TensorRT-RTX), `trtglm verify`,
and generation on the engine with a GPU, else ONNX Runtime over the same graph (`trtglm bench`).
"""

import shutil
import subprocess
import sys
from pathlib import Path

from trtglm.synthetic import glm4_config, write_random_checkpoint

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
export_only = "--export-only" in sys.argv


def trtglm(*args: str) -> None:
    print("[demo] $ trtglm " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "trtglm", *args], check=True)


shutil.rmtree(out, ignore_errors=True)
print(f"[demo] writing a random-weight GLM-4 checkpoint to {out / 'checkpoint'} (no trained model ships yet)")
write_random_checkpoint(out / "checkpoint",
                        glm4_config(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=704, vocab=8192))
trtglm("export", str(out / "checkpoint"), "-o", str(out / "export"), "--dtype", "fp16", "--max-seq-len", "1024")
if not export_only:
    trtglm("build", str(out / "export"), "-o", str(out / "build"), "--recipe", "recipes/demo-glm4-fp16.yaml")
    trtglm("verify", str(out / "build"))
    trtglm("inspect", str(out / "build"))
    print("[demo] the checkpoint has random weights and no tokenizer yet, so the demo generates token ids:")
    trtglm("bench", str(out / "build"), "--input-len", "32", "--output-len", "32")
