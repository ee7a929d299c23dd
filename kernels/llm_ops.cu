// Row and elementwise ops of the LLaMA training step (ARCHITECTURE.md §4, issue 7): RMSNorm forward and
// backward, SwiGLU forward and backward, and the AdamW update. CPU references: ops::norm
// (rms_norm_rows, rms_norm_backward), ops::activation (swiglu_forward, swiglu_backward),
// train::optim::AdamW::step.
//
// Activations and their gradients are bf16, all arithmetic fp32; AdamW keeps fp32 master weights,
// gradients and moments. No atomics: every output element has one writer, so results are
// deterministic (the weight gradient of RMSNorm is reduced over fixed row chunks, then summed).
//
//   rmsnorm_fwd        x, w [rows, C] → y, rstd [rows]          grid ceil(rows/8), block 256 (warp per row)
//   rmsnorm_bwd_dx     dx (+)= r·w·dy − r³·x·(Σ dy·w·x)/C       grid ceil(rows/8), block 256
//   rmsnorm_bwd_dw_partial  part[chunk, C] = Σ_{rows of chunk} dy·x·r   grid (ceil(C/256), chunks), block 256
//   sum_rows_f32       out[C] += Σ_k part[k, C]                  grid ceil(C/256), block 256
//   swiglu_fwd         y = silu(g)·u                             grid ceil(n/256), block 256
//   swiglu_bwd         dg (+)= dy·u·silu'(g), du (+)= dy·silu(g)  grid ceil(n/256), block 256
//   adamw_step         x ← x·decay; m, v updates; x −= step·m/(√v/bc2 + eps)   grid ceil(n/256), block 256
//   adamw_step_bf16    the same from a bf16 gradient, also writing the bf16 working copy of x (the
//                      GPU training step: GEMMs read bf16 weights, the optimizer keeps fp32 masters)
//   adamw_step_bf16w   the same from an fp32 gradient, also writing the bf16 working copy
//                      (both scale the gradient by clip[0] and skip the update when clip[1] ≠ 0)
//   sumsq_partial_bf16 part[block] = Σ x² over a grid-stride share of x   grid SUMSQ_BLOCKS, block 256
//   sumsq_partial_f32  the same for fp32 x (then sum_rows_f32 over the SUMSQ_BLOCKS partials)
//   clip_factor        [factor, skip, norm] from Σg² (train::clip_grad_norm)  grid 1, block 32
#include "common.cuh"

__device__ __forceinline__ float lo_silu(float g) {
    return g / (1.f + expf(-g));
}

// ---------------------------------------------------------------------------------------------
// RMSNorm forward: y = x · rstd · w with rstd = (Σx²/C + eps)^-½, saved for the backward.
extern "C" __global__ void rmsnorm_fwd(const bf16* __restrict__ x, const bf16* __restrict__ w, int rows, int C,
                                       float eps, bf16* __restrict__ y, float* __restrict__ rstd) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16* xr = x + (size_t)row * C;
    float ss = 0.f;
    for (int j = lane; j < C; j += 32) {
        float v = __bfloat162float(xr[j]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float r = 1.f / sqrtf(ss / (float)C + eps);
    bf16* yr = y + (size_t)row * C;
    for (int j = lane; j < C; j += 32) yr[j] = __float2bfloat16(__bfloat162float(xr[j]) * r * __bfloat162float(w[j]));
    if (lane == 0) rstd[row] = r;
}

// RMSNorm backward, input gradient: dx = r·w·dy − r³·x·(Σ_i dy_i·w_i·x_i)/C, added to dx when
// `accumulate` (the residual stream's gradient) and written otherwise.
extern "C" __global__ void rmsnorm_bwd_dx(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          const bf16* __restrict__ dy, const float* __restrict__ rstd, int rows,
                                          int C, int accumulate, bf16* __restrict__ dx) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t base = (size_t)row * C;
    float dot = 0.f;
    for (int j = lane; j < C; j += 32)
        dot += __bfloat162float(dy[base + j]) * __bfloat162float(w[j]) * __bfloat162float(x[base + j]);
    dot = warp_sum(dot);
    const float r = rstd[row], k = r * r * r * dot / (float)C;
    for (int j = lane; j < C; j += 32) {
        float d = r * __bfloat162float(w[j]) * __bfloat162float(dy[base + j]) - k * __bfloat162float(x[base + j]);
        if (accumulate) d += __bfloat162float(dx[base + j]);
        dx[base + j] = __float2bfloat16(d);
    }
}

// RMSNorm backward, weight gradient, step 1: part[chunk, j] = Σ_{r in chunk} dy[r, j]·x[r, j]·rstd[r],
// chunk c covering rows [c·rows_per_chunk, (c+1)·rows_per_chunk). One thread per column.
extern "C" __global__ void rmsnorm_bwd_dw_partial(const bf16* __restrict__ x, const bf16* __restrict__ dy,
                                                  const float* __restrict__ rstd, int rows, int C,
                                                  int rows_per_chunk, float* __restrict__ part) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (j >= C) return;
    const int r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r)
        acc += __bfloat162float(dy[(size_t)r * C + j]) * __bfloat162float(x[(size_t)r * C + j]) * rstd[r];
    part[(size_t)chunk * C + j] = acc;
}

// Step 2 (and any column sum): out[j] += Σ_k part[k, j], in order k = 0, 1, ...
extern "C" __global__ void sum_rows_f32(const float* __restrict__ part, int chunks, int C, float* __restrict__ out) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= C) return;
    float acc = 0.f;
    for (int k = 0; k < chunks; ++k) acc += part[(size_t)k * C + j];
    out[j] += acc;
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: y = silu(g)·u.
extern "C" __global__ void swiglu_fwd(const bf16* __restrict__ g, const bf16* __restrict__ u, long long n,
                                      bf16* __restrict__ y) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = __float2bfloat16(lo_silu(__bfloat162float(g[i])) * __bfloat162float(u[i]));
}

// SwiGLU backward: dg = dy·u·silu'(g), du = dy·silu(g), silu'(g) = σ(g)·(1 + g·(1 − σ(g))); added
// to dg/du when `accumulate`.
extern "C" __global__ void swiglu_bwd(const bf16* __restrict__ dy, const bf16* __restrict__ g,
                                      const bf16* __restrict__ u, long long n, int accumulate,
                                      bf16* __restrict__ dg, bf16* __restrict__ du) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gv = __bfloat162float(g[i]), uv = __bfloat162float(u[i]), d = __bfloat162float(dy[i]);
    const float s = 1.f / (1.f + expf(-gv));
    float a = d * uv * s * (1.f + gv * (1.f - s)), b = d * gv * s;
    if (accumulate) {
        a += __bfloat162float(dg[i]);
        b += __bfloat162float(du[i]);
    }
    dg[i] = __float2bfloat16(a);
    du[i] = __float2bfloat16(b);
}

// ---------------------------------------------------------------------------------------------
// AdamW (decoupled weight decay), the update of train::optim::AdamW::step with its host-side
// scalars: step_size = lr/(1 − β₁ᵗ), bc2_sqrt = √(1 − β₂ᵗ), decay = 1 − lr·wd (1 for no decay),
// c1 = 1 − β₁, c2 = 1 − β₂.
extern "C" __global__ void adamw_step(float* __restrict__ x, const float* __restrict__ grad, float* __restrict__ m,
                                      float* __restrict__ v, long long n, float b1, float c1, float b2, float c2,
                                      float step_size, float bc2_sqrt, float eps, float decay) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = grad[i];
    float xi = x[i] * decay;
    const float mi = b1 * m[i] + c1 * g;
    const float vi = b2 * v[i] + c2 * g * g;
    xi -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    m[i] = mi;
    v[i] = vi;
    x[i] = xi;
}

// AdamW for the mixed-precision training step: the fp32 master x is updated exactly as in adamw_step
// and w = bf16(x) is the copy the next forward reads. The gradient arrives in bf16 (the cuBLASLt
// weight-gradient GEMMs: adamw_step_bf16) or in fp32 (the norm weights: adamw_step_bf16w), and is
// scaled by clip[0], the clipping factor clip_factor computed on the device (so the host never waits
// for the gradient norm); clip[1] ≠ 0 (a non-finite norm) skips the update, as the CPU op set does.
__device__ __forceinline__ void lo_adamw_mixed(long long i, float g, float* __restrict__ x, float* __restrict__ m,
                                               float* __restrict__ v, bf16* __restrict__ w, float b1, float c1,
                                               float b2, float c2, float step_size, float bc2_sqrt, float eps,
                                               float decay) {
    float xi = x[i] * decay;
    const float mi = b1 * m[i] + c1 * g;
    const float vi = b2 * v[i] + c2 * g * g;
    xi -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    m[i] = mi;
    v[i] = vi;
    x[i] = xi;
    w[i] = __float2bfloat16(xi);
}

extern "C" __global__ void adamw_step_bf16(float* __restrict__ x, const bf16* __restrict__ grad,
                                           float* __restrict__ m, float* __restrict__ v, bf16* __restrict__ w,
                                           long long n, float b1, float c1, float b2, float c2, float step_size,
                                           float bc2_sqrt, float eps, float decay, const float* __restrict__ clip) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || clip[1] != 0.f) return;
    lo_adamw_mixed(i, __bfloat162float(grad[i]) * clip[0], x, m, v, w, b1, c1, b2, c2, step_size, bc2_sqrt, eps,
                   decay);
}

extern "C" __global__ void adamw_step_bf16w(float* __restrict__ x, const float* __restrict__ grad,
                                            float* __restrict__ m, float* __restrict__ v, bf16* __restrict__ w,
                                            long long n, float b1, float c1, float b2, float c2, float step_size,
                                            float bc2_sqrt, float eps, float decay, const float* __restrict__ clip) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || clip[1] != 0.f) return;
    lo_adamw_mixed(i, grad[i] * clip[0], x, m, v, w, b1, c1, b2, c2, step_size, bc2_sqrt, eps, decay);
}

// ---------------------------------------------------------------------------------------------
// Global gradient norm, on the device: each gradient's Σg² in SUMSQ_BLOCKS fixed partials (block
// b sums the elements i ≡ t (mod 256·SUMSQ_BLOCKS) of its threads t, then a tree in shared memory),
// which sum_rows_f32 (C = 1) adds in order into the running total: deterministic.
#define SUMSQ_BLOCKS 256

__device__ __forceinline__ void lo_block_sum_store(float acc, float* __restrict__ part) {
    __shared__ float red[256];
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = red[0];
}

extern "C" __global__ void sumsq_partial_bf16(const bf16* __restrict__ x, long long n, float* __restrict__ part) {
    float acc = 0.f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = __bfloat162float(x[i]);
        acc += v * v;
    }
    lo_block_sum_store(acc, part);
}

extern "C" __global__ void sumsq_partial_f32(const float* __restrict__ x, long long n, float* __restrict__ part) {
    float acc = 0.f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    lo_block_sum_store(acc, part);
}

// train::clip_grad_norm's rule: norm = √Σg²; factor = max_norm/(norm + 1e-6) when norm > max_norm
// (max_norm ≤ 0: never), else 1; skip = 1 when the norm is not finite.
extern "C" __global__ void clip_factor(const float* __restrict__ sumsq, float max_norm, float* __restrict__ out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const float norm = sqrtf(sumsq[0]);
    const int finite = isfinite(norm);
    out[0] = (finite && max_norm > 0.f && norm > max_norm) ? max_norm / (norm + 1e-6f) : 1.f;
    out[1] = finite ? 0.f : 1.f;
    out[2] = norm;
}
