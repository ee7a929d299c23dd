// Row and elementwise ops of the SAGE head's training step (models::sage; ARCHITECTURE.md §1, issue
// 7): LayerNorm forward and backward (the fact tokens' projection norm), exact-erf GELU forward and
// backward (the adapter MLP), column sums (bias gradients) and an in-place scale (LoRA's
// alpha/rank). CPU references: ops::norm (layer_norm_rows, layer_norm_backward), ops::activation
// (gelu_forward, gelu_backward), backend::step_ops::HostOps (col_sum, scale).
//
// Activations and their gradients are bf16, all arithmetic fp32. No atomics: the weight, bias and
// column sums are reduced over fixed row chunks into fp32 partials, which llm_ops.cu's
// sum_rows_f32 adds in order, so results do not depend on the device.
//
//   layernorm_fwd      x, w, b [rows, C] → y, stats [rows, 2] = (mean, rstd)   grid ceil(rows/8), block 256 (warp per row)
//   layernorm_bwd_dx   dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·w          grid ceil(rows/8), block 256
//   layernorm_bwd_dwdb_partial  pw[chunk, C] = Σ dy·x̂, pb[chunk, C] = Σ dy      grid (ceil(C/256), chunks), block 256
//   colsum_partial     part[chunk, C] = Σ_{rows of chunk} x                      grid (ceil(C/256), chunks), block 256
//   gelu_fwd           y = x·Φ(x)                                                grid ceil(n/256), block 256
//   gelu_bwd           dx = dy·(Φ(x) + x·φ(x))                                   grid ceil(n/256), block 256
//   scale_bf16         x ← s·x                                                   grid ceil(n/256), block 256
//   mul_f32            x ← x·f elementwise (fp32; E-DPO's per-instance weights)   grid ceil(n/256), block 256
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// LayerNorm forward: y = (x − mean)·rstd·w + b, rstd = (var + eps)^-½ (biased variance, two passes
// over the row as the CPU reference computes it); (mean, rstd) saved for the backward.
extern "C" __global__ void layernorm_fwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                         const bf16* __restrict__ b, int rows, int C, float eps,
                                         bf16* __restrict__ y, float* __restrict__ stats) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16* xr = x + (size_t)row * C;
    float s = 0.f;
    for (int j = lane; j < C; j += 32) s += __bfloat162float(xr[j]);
    const float mean = warp_sum(s) / (float)C;
    float ss = 0.f;
    for (int j = lane; j < C; j += 32) {
        const float d = __bfloat162float(xr[j]) - mean;
        ss += d * d;
    }
    const float r = 1.f / sqrtf(warp_sum(ss) / (float)C + eps);
    bf16* yr = y + (size_t)row * C;
    for (int j = lane; j < C; j += 32)
        yr[j] = __float2bfloat16((__bfloat162float(xr[j]) - mean) * r * __bfloat162float(w[j]) + __bfloat162float(b[j]));
    if (lane == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = r;
    }
}

// LayerNorm backward, input gradient (written, not accumulated).
extern "C" __global__ void layernorm_bwd_dx(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                            const bf16* __restrict__ dy, const float* __restrict__ stats, int rows,
                                            int C, bf16* __restrict__ dx) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t base = (size_t)row * C;
    const float mean = stats[2 * row], r = stats[2 * row + 1];
    float mg = 0.f, mgx = 0.f;
    for (int j = lane; j < C; j += 32) {
        const float g = __bfloat162float(dy[base + j]) * __bfloat162float(w[j]);
        mg += g;
        mgx += g * (__bfloat162float(x[base + j]) - mean) * r;
    }
    mg = warp_sum(mg) / (float)C;
    mgx = warp_sum(mgx) / (float)C;
    for (int j = lane; j < C; j += 32) {
        const float g = __bfloat162float(dy[base + j]) * __bfloat162float(w[j]);
        const float xh = (__bfloat162float(x[base + j]) - mean) * r;
        dx[base + j] = __float2bfloat16(r * (g - mg - xh * mgx));
    }
}

// LayerNorm backward, weight and bias gradients, step 1 (step 2: sum_rows_f32 of llm_ops.cu over
// the chunks): pw[chunk, j] = Σ dy·x̂, pb[chunk, j] = Σ dy over the chunk's rows. Thread per column.
extern "C" __global__ void layernorm_bwd_dwdb_partial(const bf16* __restrict__ x, const bf16* __restrict__ dy,
                                                      const float* __restrict__ stats, int rows, int C,
                                                      int rows_per_chunk, float* __restrict__ pw,
                                                      float* __restrict__ pb) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (j >= C) return;
    const int r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float aw = 0.f, ab = 0.f;
    for (int r = r0; r < r1; ++r) {
        const float g = __bfloat162float(dy[(size_t)r * C + j]);
        aw += g * (__bfloat162float(x[(size_t)r * C + j]) - stats[2 * r]) * stats[2 * r + 1];
        ab += g;
    }
    pw[(size_t)chunk * C + j] = aw;
    pb[(size_t)chunk * C + j] = ab;
}

// Column sums over a chunk of rows (a bias gradient, step 1; step 2 is sum_rows_f32).
extern "C" __global__ void colsum_partial(const bf16* __restrict__ x, int rows, int C, int rows_per_chunk,
                                          float* __restrict__ part) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (j >= C) return;
    const int r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) acc += __bfloat162float(x[(size_t)r * C + j]);
    part[(size_t)chunk * C + j] = acc;
}

// ---------------------------------------------------------------------------------------------
// GELU, exact form: gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2)); gelu'(x) = Φ(x) + x·φ(x).
extern "C" __global__ void gelu_fwd(const bf16* __restrict__ x, long long n, bf16* __restrict__ y) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = __bfloat162float(x[i]);
    y[i] = __float2bfloat16(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
}

extern "C" __global__ void gelu_bwd(const bf16* __restrict__ dy, const bf16* __restrict__ x, long long n,
                                    bf16* __restrict__ dx) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = __bfloat162float(x[i]);
    const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    const float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;
    dx[i] = __float2bfloat16(__bfloat162float(dy[i]) * (cdf + v * pdf));
}

// x ← s·x (the LoRA scale on the adapter's hidden and its gradient).
extern "C" __global__ void scale_bf16(bf16* __restrict__ x, long long n, float s) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = __float2bfloat16(s * __bfloat162float(x[i]));
}

// x ← x·f elementwise, fp32 (the E-DPO step weighs each sequence's ∂loss/∂π by its instance).
extern "C" __global__ void mul_f32(float* __restrict__ x, const float* __restrict__ f, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] *= f[i];
}
