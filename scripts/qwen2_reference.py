#!/usr/bin/env python3
"""Writes tests/fixtures/qwen2/reference.json: the top-10 next-token logits of Qwen2.5-Coder-0.5B-
Instruct (the pinned GGUF, Q4_K_M) at fixed positions of a fixed ChatML prompt, computed
independently of sage: tensors dequantised by the `gguf` Python package, the Qwen2 decoder written
here in numpy float64 after HF transformers' modeling_qwen2 (rotate-half RoPE, q/k/v biases, GQA,
RMSNorm, SwiGLU), the tokenizer rebuilt with the `tokenizers` package in the layout of Qwen2's
tokenizer.json. The Rust test (tests/qwen2.rs) compares sage's tokens and logits with it.

    pip install gguf==0.19.0 numpy tokenizers
    python3 scripts/qwen2_reference.py ~/.cache/sage/packages/qwen2.5-coder-0.5b-instruct-q4_k_m/*.gguf
"""
import hashlib
import json
import pathlib
import sys

import numpy as np
from gguf import GGUFReader
from gguf import quants
from tokenizers import Tokenizer

PROMPT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)
SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def field(r, key):
    return r.fields[key].contents()


def tokenizer(r):
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == 3
    ]
    spec = {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
            "ignore_merges": False,
        },
    }
    return Tokenizer.from_str(json.dumps(spec))


def main():
    path = pathlib.Path(sys.argv[1])
    r = GGUFReader(path)
    assert field(r, "general.architecture") == "qwen2"
    meta = lambda k: field(r, f"qwen2.{k}")
    n_layers, d = meta("block_count"), meta("embedding_length")
    n_heads, n_kv = meta("attention.head_count"), meta("attention.head_count_kv")
    theta, eps = meta("rope.freq_base"), meta("attention.layer_norm_rms_epsilon")
    hd = d // n_heads
    tensors = {t.name: t for t in r.tensors}

    def w(name):
        t = tensors[name]
        return quants.dequantize(t.data, t.tensor_type).astype(np.float64)

    ids = tokenizer(r).encode(PROMPT, add_special_tokens=False).ids
    T = len(ids)
    x = w("token_embd.weight")[ids]  # [T, d]

    def rmsnorm(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    inv = theta ** (-np.arange(0, hd, 2) / hd)  # [hd/2]
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]  # [T, 1, hd]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]

    def rope(q):  # q [T, heads, hd], HF rotate_half
        rot = np.concatenate([-q[..., hd // 2:], q[..., : hd // 2]], axis=-1)
        return q * cos + rot * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layers):
        p = f"blk.{i}."
        h = rmsnorm(x, w(p + "attn_norm.weight"))
        q = (h @ w(p + "attn_q.weight").T + w(p + "attn_q.bias")).reshape(T, n_heads, hd)
        k = (h @ w(p + "attn_k.weight").T + w(p + "attn_k.bias")).reshape(T, n_kv, hd)
        v = (h @ w(p + "attn_v.weight").T + w(p + "attn_v.bias")).reshape(T, n_kv, hd)
        q, k = rope(q), rope(k)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = np.einsum("hts,shd->thd", s, v).reshape(T, d)
        x = x + ctx @ w(p + "attn_output.weight").T
        h = rmsnorm(x, w(p + "ffn_norm.weight"))
        g, u = h @ w(p + "ffn_gate.weight").T, h @ w(p + "ffn_up.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ w(p + "ffn_down.weight").T
        print(f"block {i + 1}/{n_layers}", file=sys.stderr)
    h = rmsnorm(x, w("output_norm.weight"))
    head = w("output.weight") if "output.weight" in tensors else w("token_embd.weight")
    positions = [T // 2, T - 1]
    logits = h[positions] @ head.T
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    out = {
        "source": "scripts/qwen2_reference.py: gguf-py dequantisation + numpy float64 Qwen2 decoder",
        "gguf_sha256": sha,
        "prompt": PROMPT,
        "ids": ids,
        "positions": [
            {"pos": int(p), "top": [[int(j), float(row[j])] for j in np.argsort(-row)[:10]]}
            for p, row in zip(positions, logits)
        ],
    }
    dest = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/qwen2/reference.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}: {T} tokens, top-1 at the last position {out['positions'][-1]['top'][0]}")


main()
