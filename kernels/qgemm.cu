// Linear layers straight from ggml's quantized blocks (QLoRA's frozen base, quantized inference):
// the weight W [out, in] stays in the GGUF's block layout on the device and each value is
// dequantized in registers as the GEMM loads it, so the device holds 4.5–8.5 bits per weight
// instead of bf16's 16. Activations are bf16, accumulation fp32, outputs bf16.
//
// CPU reference: `quant::dequantize` (src/quant/blocks.rs, the layouts of ggml-common.h) followed
// by the f32 product; the parity tests hold every type against it.
//
// Type codes (`qtype`), in the order of `quant::QType::ALL`:
//   0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q5_1, 4 Q8_0 (32 values per block), 5 Q4_K, 6 Q5_K, 7 Q6_K (256).
// Block bytes are 18, 20, 22, 24, 34, 144, 176, 210: most are not 4-byte multiples, so blocks
// are read byte by byte (f16 scales assembled from two bytes).
#include "common.cuh"

// An IEEE half (little-endian bytes at p) as float, without cuda_fp16.h: normals and infinities by
// moving the exponent, subnormals by scaling the mantissa (2⁻²⁴ per unit).
__device__ __forceinline__ float f16_at(const unsigned char* p) {
    unsigned h = (unsigned)p[0] | ((unsigned)p[1] << 8);
    unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) {
        float v = (float)mant * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    unsigned bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112u) << 23) | (mant << 13));
    return __int_as_float((int)bits);
}

// The 6-bit scale and min of sub-block j (of 8) of a Q4_K / Q5_K super-block's 12 scale bytes.
__device__ __forceinline__ void k_scale_min(int j, const unsigned char* q, int& sc, int& mn) {
    if (j < 4) {
        sc = q[j] & 63;
        mn = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Values and bytes per block of each type code.
template <int QT>
struct QLayout {
    static constexpr int LEN = QT >= 5 ? 256 : 32;
    static constexpr int BYTES = QT == 0 ? 18 : QT == 1 ? 20 : QT == 2 ? 22 : QT == 3 ? 24 : QT == 4 ? 34 : QT == 5 ? 144 : QT == 6 ? 176 : 210;
};

// Value j (0 ≤ j < LEN) of the block at b, in the CPU dequantizer's order of operations.
template <int QT>
__device__ __forceinline__ float qvalue(const unsigned char* __restrict__ b, int j) {
    if (QT == 0 || QT == 1) {  // Q4_0: d, 16 nibble bytes; Q4_1: d, m, 16 nibble bytes
        float d = f16_at(b);
        float m = QT == 1 ? f16_at(b + 2) : -8.f * d;
        unsigned q = b[(QT == 1 ? 4 : 2) + (j & 15)];
        return (float)(j < 16 ? (q & 0xF) : (q >> 4)) * d + m;
    } else if (QT == 2 || QT == 3) {  // Q5_0 / Q5_1: element j's fifth bit is bit j of qh
        const int at = QT == 3 ? 4 : 2;
        float d = f16_at(b);
        unsigned qh = (unsigned)b[at] | ((unsigned)b[at + 1] << 8) | ((unsigned)b[at + 2] << 16) |
                      ((unsigned)b[at + 3] << 24);
        unsigned q = b[at + 4 + (j & 15)];
        unsigned v = (j < 16 ? (q & 0xF) : (q >> 4)) | (((qh >> j) & 1u) << 4);
        if (QT == 3) return (float)v * d + f16_at(b + 2);
        return ((float)v - 16.f) * d;
    } else if (QT == 4) {  // Q8_0: d, 32 signed bytes
        return f16_at(b) * (float)(signed char)b[2 + j];
    } else if (QT == 5 || QT == 6) {  // Q4_K / Q5_K: 4 chunks of 64 = two 32-value sub-blocks each
        const bool five = QT == 6;
        int chunk = j >> 6, l = j & 31, upper = (j >> 5) & 1, sub = 2 * chunk + upper;
        int sc, mn;
        k_scale_min(sub, b + 4, sc, mn);
        const unsigned char* qs = b + (five ? 48 : 16);
        unsigned q = qs[chunk * 32 + l];
        unsigned v = upper ? (q >> 4) : (q & 0xF);
        if (five) v |= ((b[16 + l] >> sub) & 1u) << 4;
        return f16_at(b) * (float)sc * (float)v - f16_at(b + 2) * (float)mn;
    } else {  // Q6_K: 128 low-nibble bytes, 64 high-bit bytes, 16 signed scales, d
        int half = j >> 7, quarter = (j >> 5) & 3, l = j & 31;
        const unsigned char* ql = b + half * 64;
        const unsigned char* qh = b + 128 + half * 32;
        const unsigned char* sc = b + 192 + half * 8;
        unsigned lo = ql[l + (quarter & 1) * 32];
        lo = quarter < 2 ? (lo & 0xF) : (lo >> 4);
        int v = (int)(lo | (((qh[l] >> (2 * quarter)) & 3u) << 4)) - 32;
        return f16_at(b + 208) * (float)(signed char)sc[l / 16 + 2 * quarter] * (float)v;
    }
}

// W[o, c] of a [out, in] matrix whose rows are in / LEN whole blocks.
template <int QT>
__device__ __forceinline__ float qat(const unsigned char* __restrict__ w, int in, int o, int c) {
    const size_t row = (size_t)o * (in / QLayout<QT>::LEN);
    return qvalue<QT>(w + (row + c / QLayout<QT>::LEN) * QLayout<QT>::BYTES, c % QLayout<QT>::LEN);
}

// The rows of x each block of the two products below keeps in registers.
constexpr int QG_ROWS = 8;

// ---------------------------------------------------------------------------------------------
// y [rows, out] = x [rows, in] · Wᵀ (+ bias) (+ y): a warp per output column o (four per block),
// QG_ROWS rows of x per block (grid.y). Each lane dequantizes one weight per 32-column step and
// multiplies it into all the block's rows, so W is read once per QG_ROWS rows of x (once per
// decode step at batch ≤ 8), then the lanes' partial sums meet in a butterfly (fixed order).
template <int QT>
__device__ __forceinline__ void qgemm_xwt_body(const unsigned char* __restrict__ w, int out, int in,
                                               const bf16* __restrict__ x, int rows, const bf16* __restrict__ bias,
                                               int has_bias, int accumulate, bf16* __restrict__ y) {
    const int lane = threadIdx.x & 31, o = blockIdx.x * 4 + (threadIdx.x >> 5), r0 = blockIdx.y * QG_ROWS;
    if (o >= out) return;
    const int nr = min(QG_ROWS, rows - r0);
    float acc[QG_ROWS];
#pragma unroll
    for (int r = 0; r < QG_ROWS; ++r) acc[r] = 0.f;
    for (int c = lane; c < in; c += 32) {
        const float wv = qat<QT>(w, in, o, c);
#pragma unroll
        for (int r = 0; r < QG_ROWS; ++r)
            if (r < nr) acc[r] = fmaf(__bfloat162float(x[(size_t)(r0 + r) * in + c]), wv, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < QG_ROWS; ++r) {
        const float s = warp_sum(acc[r]);
        if (lane == 0 && r < nr) {
            const size_t at = (size_t)(r0 + r) * out + o;
            float v = s;
            if (has_bias) v += __bfloat162float(bias[o]);
            if (accumulate) v += __bfloat162float(y[at]);
            y[at] = __float2bfloat16(v);
        }
    }
}

// grid (ceil(out / 4), ceil(rows / QG_ROWS)) × 128. `bias` is read only when has_bias (pass any
// valid pointer otherwise); `accumulate` adds into y (the residual stream), else y is overwritten.
extern "C" __global__ void __launch_bounds__(128)
    qgemm_xwt(const unsigned char* __restrict__ w, int qtype, int out, int in, const bf16* __restrict__ x, int rows,
              const bf16* __restrict__ bias, int has_bias, int accumulate, bf16* __restrict__ y) {
    switch (qtype) {
        case 0: qgemm_xwt_body<0>(w, out, in, x, rows, bias, has_bias, accumulate, y); break;
        case 1: qgemm_xwt_body<1>(w, out, in, x, rows, bias, has_bias, accumulate, y); break;
        case 2: qgemm_xwt_body<2>(w, out, in, x, rows, bias, has_bias, accumulate, y); break;
        case 3: qgemm_xwt_body<3>(w, out, in, x, rows, bias, has_bias, accumulate, y); break;
        case 4: qgemm_xwt_body<4>(w, out, in, x, rows, bias, has_bias, accumulate, y); break;
        case 5: qgemm_xwt_body<5>(w, out, in, x, rows, bias, has_bias, accumulate, y); break;
        case 6: qgemm_xwt_body<6>(w, out, in, x, rows, bias, has_bias, accumulate, y); break;
        default: qgemm_xwt_body<7>(w, out, in, x, rows, bias, has_bias, accumulate, y); break;
    }
}

// ---------------------------------------------------------------------------------------------
// dx [rows, in] = dy [rows, out] · W (+ dx): the input gradient of a frozen quantized layer (QLoRA's
// backward; W never gets a gradient). A thread per input column c (256 per block), QG_ROWS rows
// per block (grid.y); each thread walks the out rows of W down its column, dequantizing one value
// per row, while dy[r, o] is the same address across the warp (a broadcast). Sums in order of o.
template <int QT>
__device__ __forceinline__ void qgemm_dyw_body(const unsigned char* __restrict__ w, int out, int in,
                                               const bf16* __restrict__ dy, int rows, int accumulate,
                                               bf16* __restrict__ dx) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, r0 = blockIdx.y * QG_ROWS;
    if (c >= in) return;
    const int nr = min(QG_ROWS, rows - r0);
    float acc[QG_ROWS];
#pragma unroll
    for (int r = 0; r < QG_ROWS; ++r) acc[r] = 0.f;
    for (int o = 0; o < out; ++o) {
        const float wv = qat<QT>(w, in, o, c);
#pragma unroll
        for (int r = 0; r < QG_ROWS; ++r)
            if (r < nr) acc[r] = fmaf(__bfloat162float(dy[(size_t)(r0 + r) * out + o]), wv, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < QG_ROWS; ++r)
        if (r < nr) {
            const size_t at = (size_t)(r0 + r) * in + c;
            dx[at] = __float2bfloat16(accumulate ? acc[r] + __bfloat162float(dx[at]) : acc[r]);
        }
}

// grid (ceil(in / 256), ceil(rows / QG_ROWS)) × 256.
extern "C" __global__ void __launch_bounds__(256)
    qgemm_dyw(const unsigned char* __restrict__ w, int qtype, int out, int in, const bf16* __restrict__ dy, int rows,
              int accumulate, bf16* __restrict__ dx) {
    switch (qtype) {
        case 0: qgemm_dyw_body<0>(w, out, in, dy, rows, accumulate, dx); break;
        case 1: qgemm_dyw_body<1>(w, out, in, dy, rows, accumulate, dx); break;
        case 2: qgemm_dyw_body<2>(w, out, in, dy, rows, accumulate, dx); break;
        case 3: qgemm_dyw_body<3>(w, out, in, dy, rows, accumulate, dx); break;
        case 4: qgemm_dyw_body<4>(w, out, in, dy, rows, accumulate, dx); break;
        case 5: qgemm_dyw_body<5>(w, out, in, dy, rows, accumulate, dx); break;
        case 6: qgemm_dyw_body<6>(w, out, in, dy, rows, accumulate, dx); break;
        default: qgemm_dyw_body<7>(w, out, in, dy, rows, accumulate, dx); break;
    }
}

// ---------------------------------------------------------------------------------------------
// out [n, in] = bf16(W[ids[i], :]): an embedding lookup in a quantized table, or (no ids) the whole
// of W dequantized for the loss kernels, which read a bf16 head. A block per row.
template <int QT>
__device__ __forceinline__ void qrows_body(const unsigned char* __restrict__ w, int in, const int* __restrict__ ids,
                                           bf16* __restrict__ out) {
    const int i = blockIdx.x, o = ids ? ids[i] : i;
    for (int c = threadIdx.x; c < in; c += blockDim.x) out[(size_t)i * in + c] = __float2bfloat16(qat<QT>(w, in, o, c));
}

#define QG_DISPATCH_ROWS(ids)                              \
    switch (qtype) {                                       \
        case 0: qrows_body<0>(w, in, ids, out); break;     \
        case 1: qrows_body<1>(w, in, ids, out); break;     \
        case 2: qrows_body<2>(w, in, ids, out); break;     \
        case 3: qrows_body<3>(w, in, ids, out); break;     \
        case 4: qrows_body<4>(w, in, ids, out); break;     \
        case 5: qrows_body<5>(w, in, ids, out); break;     \
        case 6: qrows_body<6>(w, in, ids, out); break;     \
        default: qrows_body<7>(w, in, ids, out); break;    \
    }

// grid n × 128: row i of out is W[ids[i]].
extern "C" __global__ void __launch_bounds__(128)
    qembed(const unsigned char* __restrict__ w, int qtype, int in, const int* __restrict__ ids, bf16* __restrict__ out) {
    QG_DISPATCH_ROWS(ids)
}

// grid rows × 128: out = W.
extern "C" __global__ void __launch_bounds__(128)
    qdequant_rows(const unsigned char* __restrict__ w, int qtype, int in, bf16* __restrict__ out) {
    QG_DISPATCH_ROWS(nullptr)
}
