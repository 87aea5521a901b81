"""`make demo`: the main job end to end on the shipped model (models/tiny-glm4, a 4.2M-parameter GLM-4
trained on the King James Bible by scripts/train_tiny.py).

export (validated against transformers) -> build (fusion + fp16 TensorRT engine for RTX GPUs, built on
this CPU with TensorRT-RTX) -> verify -> generate: on the engine when a GPU is there, else with ONNX
Runtime over the same built graph (the backend line says which). Then the fp32 export -> an int8
engine (calibrated, gated on held-out text inside the build) -> eval -> generate. Then the shipped
mixture-of-experts model (models/tiny-glm4-moe) -> an int4 engine (experts int4, router fp32, gated) -> generate.
Last, `trtglm serve` on the fp16 build, asked by the openai client: a streamed chat answer and two completions at
once.
"""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4"
MOE = MODEL.parent / "tiny-glm4-moe"
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
export_only = "--export-only" in sys.argv


def trtglm(*args: str) -> None:
    print("\n[demo] $ trtglm " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "trtglm", *args], check=True)


def serve(build: Path) -> None:
    from openai import OpenAI

    args = ["serve", str(build), "--port", "0", "--json", "--model-name", "tiny-glm4"]
    print("\n[demo] $ trtglm " + " ".join(args), flush=True)
    server = subprocess.Popen([sys.executable, "-m", "trtglm", *args], stdout=subprocess.PIPE, text=True)
    try:
        url = json.loads(server.stdout.readline())["url"]
        client = OpenAI(base_url=url + "/v1", api_key="none")
        print(f"[demo] openai client -> {url}/v1/chat/completions (streamed): ", end="", flush=True)
        for chunk in client.chat.completions.create(model="tiny-glm4", max_tokens=40, temperature=0, stream=True,
                                                    messages=[{"role": "user", "content": "Who was Moses?"}]):
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()
        prompts = ["In the beginning", "And the LORD said unto Moses,"]
        with ThreadPoolExecutor(2) as pool:  # two requests at once: one batch
            answers = pool.map(lambda p: client.completions.create(model="tiny-glm4", prompt=p, max_tokens=30,
                                                                   temperature=0).choices[0].text, prompts)
            for prompt, answer in zip(prompts, answers):
                print(f"[demo] openai client -> {url}/v1/completions: {prompt}{answer}", flush=True)
    finally:
        server.terminate()
        server.wait()


shutil.rmtree(out, ignore_errors=True)
trtglm("export", str(MODEL), "-o", str(out / "export"), "--dtype", "fp16")
if not export_only:
    trtglm("build", str(out / "export"), "-o", str(out / "build"), "--recipe", "recipes/demo-glm4-fp16.yaml")
    trtglm("verify", str(out / "build"))
    trtglm("run", str(out / "build"), "--prompt", "In the beginning", "--prompt", "And the LORD said unto Moses,",
           "--max-new-tokens", "40")
    trtglm("run", str(out / "build"), "--prompt", "Blessed are the", "--max-new-tokens", "40", "--temperature",
           "0.8", "--top-p", "0.9", "--seed", "1", "--stream")
    trtglm("export", str(MODEL), "-o", str(out / "export-fp32"), "--dtype", "fp32")
    trtglm("build", str(out / "export-fp32"), "-o", str(out / "build-int8"), "--recipe", "recipes/demo-glm4-int8.yaml")
    trtglm("eval", str(out / "build-int8"), "--samples", "16")
    trtglm("run", str(out / "build-int8"), "--prompt", "In the beginning", "--max-new-tokens", "40")
    trtglm("export", str(MOE), "-o", str(out / "export-moe"), "--dtype", "fp32")
    trtglm("build", str(out / "export-moe"), "-o", str(out / "build-moe-int4"), "--recipe",
           "recipes/demo-glm4-moe-int4.yaml")
    trtglm("run", str(out / "build-moe-int4"), "--prompt", "And the LORD said unto Moses,", "--max-new-tokens", "40")
    serve(out / "build")
