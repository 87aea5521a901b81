"""`make demo`: the main job end to end on a small GLM-4 model.

Until the project ships its small trained model (issue 5), the demo writes a random-weight GLM-4
checkpoint of about 9M parameters, then runs `trtglm export` on it, which validates the ONNX graph
against transformers.
"""

import subprocess
import sys
from pathlib import Path

from trtglm.synthetic import glm4_config, write_random_checkpoint

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
ckpt = out / "checkpoint"
print(f"[demo] writing a random-weight GLM-4 checkpoint to {ckpt}")
write_random_checkpoint(ckpt, glm4_config(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=704, vocab=8192))
cmd = [sys.executable, "-m", "trtglm", "export", str(ckpt), "-o", str(out / "export")]
print("[demo] $ trtglm " + " ".join(cmd[3:]))
subprocess.run(cmd, check=True)
print(f"[demo] {out / 'export'}: " + ", ".join(sorted(p.name for p in (out / "export").iterdir())))
