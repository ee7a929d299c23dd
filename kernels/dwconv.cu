// Depthwise 2-D convolution, forward and backward (ARCHITECTURE.md §4, issue 7: the EfficientNet-Lite
// encoder's MBConv blocks): one k×k filter per channel, any stride, explicit (TensorFlow "SAME",
// asymmetric) padding, bias and an optional fused ReLU6; and the epilogue of the blocks' dense
// (1×1 and stem) convolutions, which are cuBLASLt GEMMs. CPU references: ops::conv
// (depthwise_conv2d, depthwise_conv2d_backward, conv2d) and ops::activation::relu6_.
//
// Layouts (bf16 unless noted): x [N, C, H, W], w [C, k, k], bias [C] (fp32), y [N, C, Ho, Wo]
// with Ho = (H + pad_t + pad_b − k)/stride + 1 (the host passes Ho, Wo).
//
//   dwconv_fwd      y = act(Σ_taps w·x + bias)                 thread per output, grid ceil(N·C·Ho·Wo / 256)
//   relu6_bwd       dy ← dy·[0 < y < 6] (the fused ReLU6's backward, in place)  grid ceil(n / 256)
//   dwconv_bwd_dx   dx[n,c,iy,ix] = Σ_taps dy[n,c,oy,ox]·w[c,tap] over the outputs the pixel fed:
//                     a gather (no atomics)                  thread per input, grid ceil(N·C·H·W / 256)
//   dwconv_bwd_dw   dw[c,tap] = Σ_{n,oy,ox} dy·x (tap < k²), db[c] = Σ dy (tap = k²), fp32:
//                     block per (tap, c), a fixed-order tree  grid (k² + 1, C), block 256
//   channel_bias_act  y[c, p] = act(y[c, p] + bias[c] (+ res[c, p])) over a channel-major [C, P]
//                     GEMM output (a dense convolution's bias, residual and ReLU6)  grid ceil(C·P / 256)
// No atomics: results are deterministic.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
extern "C" __global__ void dwconv_fwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                      const float* __restrict__ bias, int N, int C, int H, int W, int k, int stride,
                                      int pad_t, int pad_l, int Ho, int Wo, int relu6, bf16* __restrict__ y) {
    const long long total = (long long)N * C * Ho * Wo;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int ox = (int)(idx % Wo);
    const int oy = (int)((idx / Wo) % Ho);
    const long long nc = idx / ((long long)Ho * Wo);
    const int c = (int)(nc % C);
    const bf16* src = x + nc * H * W;
    const bf16* f = w + (size_t)c * k * k;
    float acc = bias[c];
    for (int ky = 0; ky < k; ++ky) {
        const int iy = oy * stride + ky - pad_t;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
            const int ix = ox * stride + kx - pad_l;
            if (ix >= 0 && ix < W) acc = fmaf(__bfloat162float(src[iy * W + ix]), __bfloat162float(f[ky * k + kx]), acc);
        }
    }
    if (relu6) acc = fminf(fmaxf(acc, 0.f), 6.f);
    y[idx] = __float2bfloat16(acc);
}

// ---------------------------------------------------------------------------------------------
// ReLU6 backward on the saved output: the gradient passes where 0 < y < 6.
extern "C" __global__ void relu6_bwd(bf16* __restrict__ dy, const bf16* __restrict__ y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = __bfloat162float(y[i]);
    if (!(v > 0.f && v < 6.f)) dy[i] = __float2bfloat16(0.f);
}

// ---------------------------------------------------------------------------------------------
// Input gradient: input row iy feeds output oy through tap ky when oy·stride + ky − pad_t = iy.
extern "C" __global__ void dwconv_bwd_dx(const bf16* __restrict__ dy, const bf16* __restrict__ w, int N, int C, int H,
                                         int W, int k, int stride, int pad_t, int pad_l, int Ho, int Wo,
                                         bf16* __restrict__ dx) {
    const long long total = (long long)N * C * H * W;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int ix = (int)(idx % W);
    const int iy = (int)((idx / W) % H);
    const long long nc = idx / ((long long)H * W);
    const int c = (int)(nc % C);
    const bf16* g = dy + nc * Ho * Wo;
    const bf16* f = w + (size_t)c * k * k;
    float acc = 0.f;
    for (int ky = 0; ky < k; ++ky) {
        const int ny = iy + pad_t - ky;
        if (ny < 0 || ny % stride != 0 || ny / stride >= Ho) continue;
        const int oy = ny / stride;
        for (int kx = 0; kx < k; ++kx) {
            const int nx = ix + pad_l - kx;
            if (nx < 0 || nx % stride != 0 || nx / stride >= Wo) continue;
            acc = fmaf(__bfloat162float(g[oy * Wo + nx / stride]), __bfloat162float(f[ky * k + kx]), acc);
        }
    }
    dx[idx] = __float2bfloat16(acc);
}

// ---------------------------------------------------------------------------------------------
// Weight and bias gradients: block (tap, c) sums over every (n, oy, ox) with a grid-stride loop,
// then a shared-memory tree. tap = k² is the bias.
extern "C" __global__ void dwconv_bwd_dw(const bf16* __restrict__ x, const bf16* __restrict__ dy, int N, int C,
                                         int H, int W, int k, int stride, int pad_t, int pad_l, int Ho, int Wo,
                                         float* __restrict__ dw, float* __restrict__ db) {
    __shared__ float part[256];
    const int tap = blockIdx.x, c = blockIdx.y;
    const int kk = k * k;
    const int ky = tap / k, kx = tap % k;
    const long long per_image = (long long)Ho * Wo;
    const long long total = (long long)N * per_image;
    float acc = 0.f;
    for (long long i = threadIdx.x; i < total; i += blockDim.x) {
        const int n = (int)(i / per_image);
        const int o = (int)(i % per_image);
        const int oy = o / Wo, ox = o % Wo;
        const size_t plane = (size_t)n * C + c;
        const float g = __bfloat162float(dy[plane * per_image + o]);
        if (tap == kk) {
            acc += g;
            continue;
        }
        const int iy = oy * stride + ky - pad_t, ix = ox * stride + kx - pad_l;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) acc = fmaf(g, __bfloat162float(x[plane * H * W + iy * W + ix]), acc);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        if (tap == kk)
            db[c] = part[0];
        else
            dw[(size_t)c * kk + tap] = part[0];
    }
}

// ---------------------------------------------------------------------------------------------
// The dense convolutions' epilogue, in place on y [C, P] (P = H·W of one image): bias per channel,
// the block's residual when has_res (res [C, P]), then ReLU6 when relu6.
extern "C" __global__ void channel_bias_act(bf16* __restrict__ y, const float* __restrict__ bias,
                                            const bf16* __restrict__ res, int C, int P, int has_res, int relu6) {
    const long long n = (long long)C * P;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = __bfloat162float(y[i]) + bias[i / P];
    if (has_res) v += __bfloat162float(res[i]);
    if (relu6) v = fminf(fmaxf(v, 0.f), 6.f);
    y[i] = __float2bfloat16(v);
}
