#!/usr/bin/env python3
"""HF transformers counterpart of `sage bench train`: the same LLaMA-layout configs (random init),
the same batch, sequence, token ids and optimizer (AdamW, PyTorch defaults, lr 1e-5), timed the
same way (one warm-up step, median of the timed steps); then greedy generation at the same batch
sizes. Runs each model with attn_implementation "eager" and "sdpa". On a GPU in bf16; on the CPU in
f32 with as many threads as sage used (SAGE_THREADS / --threads). Prints one JSON object.

    python3 benches/train_hf.py --models smollm2-135m,qwen2-0.5b --batch 1 --seq 128 --steps 3 \
        --gen-prompt 16 --gen-tokens 32 --gen-batch 1,16 [--threads 2]
"""

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

# The shapes of src/models/random_init.rs (LLaMA layout, no attention biases, tied LM head).
PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0),
}


def tokens(b, n, vocab):
    """The token ids of src/cli/bench_train.rs."""
    return [(b * 7919 + i * 104729 + 17) % vocab for i in range(n)]


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name, attn, a, device, dtype):
    cfg = LlamaConfig(**PRESETS[name], head_dim=PRESETS[name]["hidden_size"] // PRESETS[name]["num_attention_heads"],
                      rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=True,
                      attention_bias=False, mlp_bias=False, initializer_range=0.02)
    cfg._attn_implementation = attn
    peak_reset(device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.config._attn_implementation = attn
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    seqs = [tokens(b, a.seq + 1, cfg.vocab_size) for b in range(a.batch)]
    ids = torch.tensor([s[: a.seq] for s in seqs], device=device)
    labels = torch.tensor([s[1:] for s in seqs], device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, cfg.vocab_size), labels.view(-1))
        loss.backward()
        opt.step()
        return loss.item()

    model.train()
    loss_first = step()
    times, loss_last = [], loss_first
    for i in range(a.steps):
        sync(device)
        t = time.perf_counter()
        loss_last = step()
        sync(device)
        times.append(time.perf_counter() - t)
        print(f"{name} ({attn}): step {i + 1}/{a.steps} {times[-1]:.2f} s, loss {loss_last:.4f}", file=sys.stderr)
    step_s = statistics.median(times)
    gen = []
    model.eval()
    for gb in a.gen_batch:
        prompt = torch.tensor([tokens(b + 1000, a.gen_prompt, cfg.vocab_size) for b in range(gb)], device=device)
        with torch.no_grad():
            sync(device)
            peak_reset(device)
            t = time.perf_counter()
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.gen_tokens,
                                 min_new_tokens=a.gen_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
            sync(device)
            dt = time.perf_counter() - t
        new = (out.shape[1] - a.gen_prompt) * gb
        gen.append(dict(batch=gb, prompt_tokens=a.gen_prompt, new_tokens=new // gb, tokens_per_second=new / dt,
                        peak_bytes=peak_bytes(device)))
        print(f"{name} ({attn}): generation batch {gb}: {new / dt:.1f} tokens/s", file=sys.stderr)
    result = dict(model=name, attn=attn, parameters=params, batch=a.batch, seq=a.seq, step_ms=step_s * 1e3,
                  train_tokens_per_second=a.batch * a.seq / step_s, peak_bytes=peak_bytes(device),
                  loss_first=loss_first, loss_last=loss_last, generation=gen)
    del model, opt
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2-0.5b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gen-prompt", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--gen-batch", default="1,16")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (match sage's)")
    ap.add_argument("--attn", default="eager,sdpa")
    a = ap.parse_args()
    a.gen_batch = [int(x) for x in a.gen_batch.split(",") if x] if a.gen_tokens > 0 else []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.threads:
        torch.set_num_threads(a.threads)
    results = [bench_model(m, attn, a, device, dtype) for m in a.models.split(",") for attn in a.attn.split(",")]
    info = dict(torch=torch.__version__, transformers=transformers.__version__, device=str(device), dtype=str(dtype),
                threads=torch.get_num_threads())
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(0)
    json.dump(dict(info=info, steps=a.steps, results=results), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
