#!/usr/bin/env python3
"""PyTorch references for `sage bench kernels` (ARCHITECTURE.md §9), at the same shapes and inputs' kinds.

Each op runs in PyTorch eager and under torch.compile (fusion attention also with SDPA); the E-DPO
loss runs the unfused TRL-style way (full [N, T, V] logits, log_softmax, gather). Timings are
medians of CUDA-event timings after warm-up; peak memory is torch.cuda.max_memory_allocated above
the inputs. Prints one JSON object. `--quick` uses the small shapes of `sage bench kernels --quick`
(and runs on the CPU when there is no GPU, to check the script itself).

    python3 benches/kernels_torch.py [--quick] [--repeats 20] [--warmup 3] [--no-compile]
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def shapes(quick):
    if quick:
        return {
            "mincos": dict(B=2, P=196, P_ref=196, C=256, K=16),
            "fusion": dict(B=2, L=16, S=64, H=4, D=64),
            "gemm": [512],
            "edpo": dict(pairs=2, T=128, C=256, V=4096),
            "decode": dict(B=2, T=128, H=4, H_kv=2, D=64),
            "dwconv": dict(N=2, C=16, H=28, W=28, k=3, stride=1),
        }
    return {
        "mincos": dict(B=32, P=1024, P_ref=1024, C=1024, K=32),
        "fusion": dict(B=32, L=16, S=64, H=16, D=128),
        "gemm": [4096, 8192],
        "edpo": dict(pairs=8, T=1024, C=896, V=151936),
        "decode": dict(B=16, T=1024, H=14, H_kv=2, D=64),
        "dwconv": dict(N=32, C=144, H=56, W=56, k=5, stride=2),
    }


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def median_ms(self, fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def peak_extra_bytes(self, fn):
        """Peak allocated bytes above what was allocated before `fn` (CUDA only)."""
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated() - base


def rand(shape, device, dtype=torch.bfloat16, requires_grad=False):
    x = (torch.rand(shape, device=device, dtype=torch.float32) * 2 - 1).to(dtype)
    return x.requires_grad_(requires_grad)


# --- min-cosine top-K ----------------------------------------------------------------------------
def mincos_topk(t, r, k):
    """Nearest-reference cosine per test patch, the K lowest, their values and differences."""
    tn = F.normalize(t, dim=-1)
    rn = F.normalize(r, dim=-1)
    sim = torch.bmm(tn, rn.transpose(1, 2))  # [B, P, P'] materialised
    s, nn = sim.max(dim=-1)
    amap = 1 - s
    top = torch.topk(s, k, dim=-1, largest=False).indices  # [B, K]
    v_sel = torch.gather(t, 1, top[..., None].expand(-1, -1, t.shape[-1]))
    nn_sel = torch.gather(nn, 1, top)
    d = v_sel - torch.gather(r, 1, nn_sel[..., None].expand(-1, -1, r.shape[-1]))
    return s, nn, amap, top, v_sel, d


# --- fusion attention ----------------------------------------------------------------------------
def fusion_eager(q, k, v):
    """q [B, L, H, D], k/v [B, S, H, D]: softmax(q·kᵀ/√D)·v, the same layout as the kernel."""
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("blhd,bshd->bhls", q, k) * scale
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.einsum("bhls,bshd->blhd", p, v)


def fusion_sdpa(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


# --- E-DPO, unfused (TRL-style) ------------------------------------------------------------------
def edpo_unfused(h, w, targets, mask, ref_seq, chosen, rejected, delta_h, beta=0.1, eta=1.0):
    logits = h @ w.T  # [N, T, V], bf16
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.gather(logp, -1, targets[..., None]).squeeze(-1)
    seq = (tok * mask).sum(-1)
    lr = seq - ref_seq
    margin = beta * (lr[chosen] - lr[rejected]) - eta * delta_h.abs()
    return -F.logsigmoid(margin).mean()


def decode_sdpa(q, k, v):
    """One query per sequence over its whole cache, grouped heads expanded as HF's eager does."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v)


def tf_same_pad(n, k, s):
    out = (n + s - 1) // s
    pad = max((out - 1) * s + k - n, 0)
    return pad // 2, pad - pad // 2


def dwconv_relu6(x, w, b, k, stride):
    """TensorFlow "SAME" padding (asymmetric at stride 2), depthwise conv, bias, ReLU6."""
    top, bottom = tf_same_pad(x.shape[2], k, stride)
    left, right = tf_same_pad(x.shape[3], k, stride)
    y = F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride=stride, groups=x.shape[1])
    return F.relu6(y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        sys.exit("no CUDA device: the §9 shapes are for the GPU machine (use --quick to check the script)")
    torch.manual_seed(0)
    timer = Timer(device)
    sz = shapes(args.quick)
    cases = []
    compile_ok = not args.no_compile
    warm, rep = args.warmup, args.repeats

    def add(op, variant, shape, fn, peak_fn=None, flops=None):
        ms = timer.median_ms(fn, warm, rep)
        peak = timer.peak_extra_bytes(peak_fn or fn)
        cases.append(
            dict(op=op, variant=variant, shape=shape, median_ms=ms, peak_extra_bytes=peak,
                 tflops=(flops / (ms * 1e-3) / 1e12) if flops else None)
        )
        print(f"  {op:<20} {variant:<14} {ms:10.3f} ms", file=sys.stderr)

    def compiled(fn):
        nonlocal compile_ok
        if not compile_ok:
            return None
        try:
            return torch.compile(fn)
        except Exception as e:  # noqa: BLE001 - report and go on without compile
            print(f"torch.compile unavailable: {e}", file=sys.stderr)
            compile_ok = False
            return None

    # min-cos top-K
    m = sz["mincos"]
    t = rand((m["B"], m["P"], m["C"]), device)
    r = rand((m["B"], m["P_ref"], m["C"]), device)
    add("mincos_topk", "eager", m, lambda: mincos_topk(t, r, m["K"]))
    fn = compiled(mincos_topk)
    if fn is not None:
        add("mincos_topk", "compile", m, lambda: fn(t, r, m["K"]))

    # fusion attention, forward + backward
    f = sz["fusion"]
    q = rand((f["B"], f["L"], f["H"], f["D"]), device, requires_grad=True)
    k = rand((f["B"], f["S"], f["H"], f["D"]), device, requires_grad=True)
    v = rand((f["B"], f["S"], f["H"], f["D"]), device, requires_grad=True)
    dout = rand((f["B"], f["L"], f["H"], f["D"]), device)

    def fwd_bwd(impl):
        def go():
            q.grad = k.grad = v.grad = None
            impl(q, k, v).backward(dout)
        return go

    add("fusion_attn_fwd_bwd", "eager", f, fwd_bwd(fusion_eager))
    add("fusion_attn_fwd_bwd", "sdpa", f, fwd_bwd(fusion_sdpa))
    fn = compiled(fusion_eager)
    if fn is not None:
        add("fusion_attn_fwd_bwd", "compile", f, fwd_bwd(fn))
    del q, k, v, dout

    # bf16 GEMM
    for n in sz["gemm"]:
        a, b = rand((n, n), device), rand((n, n), device)
        add("gemm_bf16", "torch.matmul", dict(m=n, n=n, k=n), lambda: torch.matmul(a, b), flops=2.0 * n**3)
        del a, b

    # E-DPO loss, unfused, forward + backward to the hidden states (LM head frozen)
    e = sz["edpo"]
    N, T = 2 * e["pairs"], e["T"]
    h = rand((N, T, e["C"]), device, requires_grad=True)
    w = rand((e["V"], e["C"]), device)
    rows = torch.arange(N * T, device=device, dtype=torch.int64)
    targets = ((rows * 2654435761) % e["V"]).view(N, T)
    mask = (torch.arange(T, device=device) >= T - T // 4).to(torch.float32).expand(N, T)
    ref_seq = torch.full((N,), -50.0, device=device)
    chosen = torch.arange(0, N, 2, device=device)
    rejected = chosen + 1
    delta_h = torch.full((e["pairs"],), 0.1, device=device)

    def edpo_step():
        h.grad = None
        edpo_unfused(h, w, targets, mask, ref_seq, chosen, rejected, delta_h).backward()

    shape = dict(e, N=N, answer_tokens=T // 4)
    add("edpo_loss_fwd_bwd", "unfused", shape, edpo_step)
    fn = compiled(edpo_unfused)
    if fn is not None:
        def edpo_compiled():
            h.grad = None
            fn(h, w, targets, mask, ref_seq, chosen, rejected, delta_h).backward()
        try:
            add("edpo_loss_fwd_bwd", "unfused+compile", shape, edpo_compiled)
        except Exception as ex:  # noqa: BLE001 - e.g. out of memory under compile
            print(f"edpo under torch.compile failed: {ex}", file=sys.stderr)

    # decode attention: B queries at the last of T cached positions (SDPA, as HF's sdpa generate), at
    # the benchmark's batch and at batch 1
    for d in (sz["decode"], dict(sz["decode"], B=1)):
        q = rand((d["B"], d["H"], 1, d["D"]), device)
        kc = rand((d["B"], d["H_kv"], d["T"], d["D"]), device)
        vc = rand((d["B"], d["H_kv"], d["T"], d["D"]), device)
        add("decode_attn", "sdpa", d, lambda: decode_sdpa(q, kc, vc))
        del q, kc, vc

    # depthwise convolution, forward (bias, ReLU6) + backward to x, w and b
    c = sz["dwconv"]
    x = rand((c["N"], c["C"], c["H"], c["W"]), device, requires_grad=True)
    wd = rand((c["C"], 1, c["k"], c["k"]), device, requires_grad=True)
    bd = torch.full((c["C"],), 0.1, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = rand((c["N"], c["C"], -(-c["H"] // c["stride"]), -(-c["W"] // c["stride"])), device)

    def conv_step(impl):
        def go():
            x.grad = wd.grad = bd.grad = None
            impl(x, wd, bd, c["k"], c["stride"]).backward(dy)
        return go

    add("dwconv_fwd_bwd", "eager", c, conv_step(dwconv_relu6))
    fn = compiled(dwconv_relu6)
    if fn is not None:
        add("dwconv_fwd_bwd", "compile", c, conv_step(fn))
    del x, wd, bd, dy

    info = dict(torch=torch.__version__, device=str(device))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                    total_memory_bytes=p.total_memory)
    json.dump(dict(info=info, quick=args.quick, warmup=warm, repeats=rep, cases=cases), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
