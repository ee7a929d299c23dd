// KV-cached decoding for the LLaMA decoder (DESIGN.md §4, issue 7: generation on the GPU): RoPE at
// explicit positions, the append of new keys/values into the cache, and single-query attention
// over the cache. Inference only, so there is no backward. CPU references: ops::rope
// (rotate_pairs_ at a start position), ops::attention (attention with Mask::Causal { start: pos }
// over one sequence's cached rows), as models::llama_train::decode_step_batch uses them.
//
// Layouts (bf16 unless noted): a cache holds S sequences of `slots` positions,
//   kc, vc [S, slots, H_kv, D];
// the N rows of one decode step are queries q [N, H, D] of sequence seq[n] at position pos[n]
// (int32, seq[n] < S, pos[n] < slots), and see that sequence's keys 0..=pos[n].
//
//   rope_pairs_at   x[r, head, 2i:2i+2] rotated by angle(pos[r], i), in place
//                     grid ceil(rows·heads·D/2 / 256), block 256
//   kv_append       dst[seq[r], pos[r], :] = src[r, :] (W = H_kv·D)   grid rows, block 128
//   decode_attn     out[n, h] = softmax(scale·q·Kᵀ)·V over keys 0..=pos[n] of kv head h / (H/H_kv)
//                     grid (H, N), block 128, static smem (4·256 + 256 + 8)·4 bytes
//
// decode_attn, variant 1 (kept): the block's 4 warps take the key tiles w, w+4, w+8, ... of 32
// keys; a lane scores one key (q in shared memory as fp32, the key row read from global memory,
// where L1 keeps the 32 rows a warp touches), each warp runs an online softmax over its tiles, and
// the four (max, sum, accumulator) triples are merged in shared memory. A block per (head, query)
// is enough for the short contexts of the lite backbones (a decode step is launch-bound there);
// splitting long contexts over several blocks (flash-decoding) is the next variant.
// No atomics: results are deterministic. Limits: D even and ≤ 256.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

#define DA_WARPS 4
#define DA_TILE 32
#define DA_DPL 8  // accumulators per lane: D ≤ 32 · DA_DPL
#define DA_MAXD 256

__device__ __forceinline__ float da_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float da_warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// ---------------------------------------------------------------------------------------------
// RoPE on interleaved pairs at explicit positions: row r of x [rows, heads, D] turns by pos[r]·θ_i.
// cos/sin [max_pos, D/2] fp32, the host's ops::rope table (as rope_pairs in llm_attn.cu).
extern "C" __global__ void rope_pairs_at(bf16* __restrict__ x, const float* __restrict__ cos_t,
                                         const float* __restrict__ sin_t, const int* __restrict__ pos, int rows,
                                         int heads, int D) {
    const int half = D >> 1;
    const long long n = (long long)rows * heads * half;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int i = (int)(idx % half);
    const long long rh = idx / half;  // row · heads + head
    const int p = pos[rh / heads];
    const float c = cos_t[(size_t)p * half + i], s = sin_t[(size_t)p * half + i];
    bf16* e = x + rh * D + 2 * i;
    const float a = __bfloat162float(e[0]), b = __bfloat162float(e[1]);
    e[0] = __float2bfloat16(a * c - b * s);
    e[1] = __float2bfloat16(a * s + b * c);
}

// ---------------------------------------------------------------------------------------------
// Cache append: row r of src [rows, W] goes to slot pos[r] of sequence seq[r] of dst [S, slots, W].
// One block per row; the prefill appends a whole right-padded batch (seq = r / T, pos = r % T).
extern "C" __global__ void kv_append(const bf16* __restrict__ src, const int* __restrict__ seq,
                                     const int* __restrict__ pos, int rows, int W, int slots,
                                     bf16* __restrict__ dst) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* s = src + (size_t)r * W;
    bf16* d = dst + ((size_t)seq[r] * slots + pos[r]) * W;
    for (int j = threadIdx.x; j < W; j += blockDim.x) d[j] = s[j];
}

// ---------------------------------------------------------------------------------------------
// Single-query attention over the cache (variant 1, see the header). A warp that gets no tile
// (fewer than 4 tiles of keys) keeps m = −inf, l = 0 and drops out of the merge.
extern "C" __global__ void __launch_bounds__(128) decode_attn(const bf16* __restrict__ q,
                                                              const bf16* __restrict__ kc,
                                                              const bf16* __restrict__ vc,
                                                              const int* __restrict__ seq,
                                                              const int* __restrict__ pos, int N, int slots, int H,
                                                              int Hkv, int D, float scale, bf16* __restrict__ out) {
    __shared__ float qs[DA_MAXD];
    __shared__ float os[DA_WARPS][DA_MAXD];
    __shared__ float ms[DA_WARPS], ls[DA_WARPS];
    const int h = blockIdx.x, n = blockIdx.y;
    if (n >= N) return;
    const int g = h / (H / Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int len = pos[n] + 1;
    const size_t seq_row = (size_t)seq[n] * slots;  // row of (seq, position 0) in [S·slots]
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = __bfloat162float(q[((size_t)n * H + h) * D + d]);
    __syncthreads();

    const float neg_inf = -__int_as_float(0x7f800000);
    float m = neg_inf, l = 0.f, o[DA_DPL];
#pragma unroll
    for (int r = 0; r < DA_DPL; ++r) o[r] = 0.f;
    for (int s0 = warp * DA_TILE; s0 < len; s0 += DA_WARPS * DA_TILE) {
        const int j = s0 + lane;
        const bool seen = j < len;
        float sc = neg_inf;
        if (seen) {
            const bf16* kr = kc + ((seq_row + j) * Hkv + g) * D;
            float acc = 0.f;
            for (int d = 0; d < D; d += 2) {
                float2 kv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(kr + d));
                acc = fmaf(qs[d], kv.x, acc);
                acc = fmaf(qs[d + 1], kv.y, acc);
            }
            sc = acc * scale;
        }
        const float m_new = fmaxf(m, da_warp_max(sc));  // finite: lane 0's key is always seen
        const float p = seen ? expf(sc - m_new) : 0.f;
        const float corr = expf(m - m_new);  // 0 on the warp's first tile (m = −inf)
        l = l * corr + da_warp_sum(p);
#pragma unroll
        for (int r = 0; r < DA_DPL; ++r) o[r] *= corr;
        const int cnt = min(DA_TILE, len - s0);
        for (int jj = 0; jj < cnt; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const bf16* vr = vc + ((seq_row + s0 + jj) * Hkv + g) * D;
#pragma unroll
            for (int r = 0; r < DA_DPL; ++r) {
                const int d = r * 32 + lane;
                if (d < D) o[r] = fmaf(pj, __bfloat162float(vr[d]), o[r]);
            }
        }
        m = m_new;
    }
    if (lane == 0) {
        ms[warp] = m;
        ls[warp] = l;
    }
#pragma unroll
    for (int r = 0; r < DA_DPL; ++r) {
        const int d = r * 32 + lane;
        if (d < D) os[warp][d] = o[r];
    }
    __syncthreads();
    float mx = ms[0];
    for (int w = 1; w < DA_WARPS; ++w) mx = fmaxf(mx, ms[w]);
    float wt[DA_WARPS], total = 0.f;
    for (int w = 0; w < DA_WARPS; ++w) {
        wt[w] = ms[w] == neg_inf ? 0.f : expf(ms[w] - mx);
        total += ls[w] * wt[w];
    }
    const float inv = 1.f / total;  // ≥ 1 term of exp(0): the warp holding the max
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int w = 0; w < DA_WARPS; ++w) acc += os[w][d] * wt[w];
        out[((size_t)n * H + h) * D + d] = __float2bfloat16(acc * inv);
    }
}
