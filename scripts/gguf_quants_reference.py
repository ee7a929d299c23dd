#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/quants.json: random blocks of every quantised GGUF type sage reads,
dequantised by the `gguf` Python package (ggml's reference layouts in numpy), for the parity test
in src/formats/gguf.rs. Scales are drawn as finite f16; everything else is random bytes.

    pip install gguf==0.19.0 numpy && python3 scripts/gguf_quants_reference.py
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

rng = np.random.default_rng(20261203)
BLOCKS = 2
# (type, block bytes, byte offsets of f16 scale fields)
LAYOUTS = [
    (T.Q4_0, 18, [0]),
    (T.Q4_1, 20, [0, 2]),
    (T.Q5_0, 22, [0]),
    (T.Q5_1, 24, [0, 2]),
    (T.Q8_0, 34, [0]),
    (T.Q4_K, 144, [0, 2]),
    (T.Q5_K, 176, [0, 2]),
    (T.Q6_K, 210, [208]),
]

cases = []
for ty, size, f16_at in LAYOUTS:
    raw = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
    for at in f16_at:
        scale = rng.uniform(-0.05, 0.05, size=BLOCKS).astype(np.float16)
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(BLOCKS, 2)
    values = quants.dequantize(raw.reshape(-1), ty).reshape(-1).astype(np.float32)
    cases.append({"type": ty.name, "bytes": raw.tobytes().hex(), "values": [float(v) for v in values]})

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/gguf/quants.json"
out.write_text(json.dumps({"source": "gguf-py quants.dequantize", "cases": cases}))
print(f"wrote {out} ({len(cases)} types × {BLOCKS} blocks)")
