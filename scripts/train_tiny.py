"""Train the small GLM-4 model trtglm ships (models/tiny-glm4) and write trtglm/data/ (calibration and held-out text);
with --moe, the small mixture-of-experts model (models/tiny-glm4-moe) on the same text and tokenizer.

    apt-get install bible-kjv        # the King James Bible (public domain) and its `bible` reader
    python scripts/train_tiny.py [--minutes 20 | --steps N] [--seed 0]
    python scripts/train_tiny.py --moe --steps N     # after the dense model: reads its tokenizer

The shipped model was trained with `--minutes 18` (1317 steps on the 2-core project machine): a
time budget makes the step count depend on the machine; `--steps` fixes it.

Steps: corpus (every verse, references stripped, grouped by chapter) -> splits by chapter index
(i % 20 == 0: eval, == 1: calibration, else train) -> byte-level BPE tokenizer (3072 tokens, any
text encodes) with GLM-4's special tokens and chat template -> Glm4ForCausalLM (grouped-query
attention, partial interleaved rotary, the extra norms) trained from a fixed seed for a wall-clock
budget -> fp16 safetensors + held-out perplexity against a unigram baseline + sample continuations.

The MoE model is a Glm4MoeForCausalLM (8 routed experts, top-2 within 2 of 4 groups, a shared expert,
q/k norms, rotate-half rotary, the first layer dense). Its experts are balanced without an auxiliary loss,
as GLM-4.5 was: after each step every layer's e_score_correction_bias moves by a fixed amount toward the
experts chosen less than average (and away from the others), so the trained bias changes which experts
are chosen, which an export must reproduce.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT, MOE_OUT, DATA = ROOT / "models" / "tiny-glm4", ROOT / "models" / "tiny-glm4-moe", ROOT / "trtglm" / "data"
BIAS_UPDATE = 1e-3  # the correction bias's step per training step
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>"]
CHAT_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the", "The kingdom of heaven is"]


def corpus() -> list[str]:
    """One string per chapter, from Debian's bible-kjv."""
    if shutil.which("bible") is None:
        raise SystemExit("needs Debian's bible-kjv: apt-get install bible-kjv")
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+?\d+):\d+ (.*)$", line.strip())
        if m:
            chapters.setdefault(m.group(1), []).append(m.group(2).strip())
    return [" ".join(verses) for verses in chapters.values()]


def split(chapters: list[str]) -> dict[str, list[str]]:
    splits = {"eval": [], "calibration": [], "train": []}
    for i, chapter in enumerate(chapters):
        splits["eval" if i % 20 == 0 else "calibration" if i % 20 == 1 else "train"].append(chapter)
    return splits


def write_splits(chapters: list[str]) -> dict[str, list[str]]:
    splits = split(chapters)
    DATA.mkdir(exist_ok=True)
    digests = {}
    for name in ("calibration", "eval"):
        f = DATA / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in splits[name]))
        digests[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    (DATA / "README.md").write_text(f"""# Calibration and evaluation text

Source: the King James Version of the Bible (public domain), from Debian's `bible-kjv-text`
package (version 4.38, read with its `bible` program), every verse with its reference stripped,
one JSON object `{{"text": ...}}` per chapter.

Splits, by chapter index i over the 1189 chapters in canonical order: i % 20 == 0 -> `eval.jsonl`
({len(splits['eval'])} chapters), i % 20 == 1 -> `calibration.jsonl` ({len(splits['calibration'])} chapters);
the other {len(splits['train'])} chapters trained the shipped model (`models/tiny-glm4`) and are not
shipped. Neither file was seen in training. Made by `scripts/train_tiny.py`.

| file | bytes | sha256 |
|---|---|---|
| calibration.jsonl | {(DATA / 'calibration.jsonl').stat().st_size} | {digests['calibration']} |
| eval.jsonl | {(DATA / 'eval.jsonl').stat().st_size} | {digests['eval']} |
""")
    return splits


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3072, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte: any text encodes
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget (the shipped model: 18)")
    ap.add_argument("--steps", type=int, default=None,
                    help="train exactly this many steps instead (a schedule that does not depend on the machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--moe", action="store_true", help="the mixture-of-experts model, with the dense model's tokenizer")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    if args.moe:
        from transformers import AutoTokenizer

        splits, tokenizer, out_dir = split(corpus()), AutoTokenizer.from_pretrained(OUT), MOE_OUT
    else:
        splits = write_splits(corpus())
        tokenizer, out_dir = train_tokenizer(splits["train"]), OUT
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def stream(texts):
        ids = []
        for t in texts:
            ids += tokenizer.encode(t) + [eos]
        return np.array(ids, np.int64)

    train, held = stream(splits["train"]), stream(splits["eval"])
    model = build_model(tokenizer, eos, args.moe)
    loads = track_routing(model) if args.moe else None
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters; train {len(train):,} tokens, eval {len(held):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    budget, started, step, warmup = args.minutes * 60, time.time(), 0, 100
    while True:
        elapsed = time.time() - started
        if (elapsed >= budget) if args.steps is None else (step >= args.steps):
            break
        frac = elapsed / budget if args.steps is None else step / args.steps
        lr = 3e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(train) - args.seq_len - 1, args.batch)
        batch = torch.from_numpy(np.stack([train[s:s + args.seq_len + 1] for s in starts]))
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if loads is not None:
            balance(model, loads)
        step += 1
        if step % 50 == 0:
            print(f"step {step} {elapsed / 60:.1f} min loss {loss.item():.3f} lr {lr:.2e}", flush=True)
    model.eval()
    ppl = perplexity(model, held, args.seq_len)
    counts = np.bincount(train, minlength=len(tokenizer)).astype(np.float64) + 1.0
    unigram = float(np.exp(-np.mean(np.log(counts[held] / counts.sum()))))
    samples = {}
    with torch.inference_mode():
        for p in PROMPTS:
            ids = torch.tensor([tokenizer.encode(p)])
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=eos)
            samples[p] = tokenizer.decode(out[0, ids.shape[1]:])
    shutil.rmtree(out_dir, ignore_errors=True)
    model.to(torch.float16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {"parameters": params, "steps": step, "tokens_seen": step * args.batch * args.seq_len,
              "minutes": round((time.time() - started) / 60, 1), "seed": args.seed,
              "eval_perplexity": ppl, "unigram_perplexity": unigram, "greedy_continuations": samples}
    if args.moe:
        biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        report["correction_bias_absmax"] = max(float(b.abs().max()) for b in biases)
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def build_model(tokenizer, eos: int, moe: bool):
    from transformers import Glm4Config, Glm4ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  attention_bias=True, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                  pad_token_id=eos, eos_token_id=[eos, tokenizer.convert_tokens_to_ids("<|user|>"),
                                                  tokenizer.convert_tokens_to_ids("<|observation|>")])
    if not moe:
        return Glm4ForCausalLM(Glm4Config(intermediate_size=640, **common))
    return Glm4MoeForCausalLM(Glm4MoeConfig(
        intermediate_size=640, moe_intermediate_size=192, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, use_qk_norm=True, num_nextn_predict_layers=0, **common))


def track_routing(model) -> dict:
    """router -> tokens per expert in the last forward pass."""
    loads = {}

    def hook(module, args, output):
        loads[module] = torch.bincount(output[2].flatten(), minlength=module.num_experts)

    for module in model.modules():
        if type(module).__name__.endswith("TopkRouter"):
            module.register_forward_hook(hook)
    return loads


def balance(model, loads: dict) -> None:
    """Aux-loss-free load balancing: each expert's correction bias steps up if it was chosen less than the
    average, down if more."""
    with torch.no_grad():
        for router, load in loads.items():
            router.e_score_correction_bias += BIAS_UPDATE * torch.sign(load.float().mean() - load.float())


def perplexity(model, ids: np.ndarray, seq_len: int) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - seq_len - 1, seq_len):
            chunk = torch.from_numpy(ids[s:s + seq_len + 1])[None]
            logits = model(input_ids=chunk[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += seq_len
    return math.exp(total / count)


if __name__ == "__main__":
    main()
