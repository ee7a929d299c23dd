// KV-cached decoding for the LLaMA decoder (ARCHITECTURE.md §4, issue 7: generation on the GPU): RoPE at
// explicit positions, the append of new keys/values into the cache, and single-query attention
// over the cache. Inference only, so there is no backward. CPU references: ops::rope
// (rotate_pairs_ at a start position), ops::attention (attention with Mask::Causal { start: pos }
// over one sequence's cached rows), as the decode steps of models::llama use them.
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
//   decode_attn_split, decode_attn_combine   variant 2: the same over `splits` key chunks
//                     grid (H, N, splits) then (H, N), fp32 partials [N, H, splits, D + 2]
//
// decode_attn, variant 1 (kept): the block's 4 warps take the key tiles w, w+4, w+8, ... of 32
// keys; a lane scores one key (q in shared memory as fp32, the key row read from global memory,
// where L1 keeps the 32 rows a warp touches), each warp runs an online softmax over its tiles, and
// the four (max, sum, accumulator) triples are merged in shared memory. A block per (head, query)
// is enough for the short contexts of the lite backbones (a decode step is launch-bound there).
// Variant 2 splits each query's keys over several blocks (flash-decoding) and merges the chunks in
// a second kernel: more parallelism when N·H is below the SM count. `sage bench kernels` times
// both; the op set runs variant 1 until a device has measured them.
// No atomics: results are deterministic. Limits: D even and ≤ 256.

#include "common.cuh"

#define DA_WARPS 4
#define DA_TILE 32
#define DA_DPL 8  // accumulators per lane: D ≤ 32 · DA_DPL
#define DA_MAXD 256

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
    rotate_pair(x + rh * D + 2 * i, c, s);
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
// Single-query attention of one (head h, query n) block over the keys [k0, k1) of its sequence:
// the 4 warps take the 32-key tiles k0 + 32·w, k0 + 32·(w + 4), ..., each with an online softmax;
// the block's merged running max and sum come back in *m_out, *l_out and its unnormalised
// accumulator in acc[0, D) (shared memory). A warp that gets no tile keeps m = −inf, l = 0 and
// drops out of the merge; an empty range gives m = −inf, l = 0, acc = 0.
__device__ void da_block_attend(const float* qs, const bf16* __restrict__ kc, const bf16* __restrict__ vc,
                                size_t seq_row, int g, int Hkv, int D, float scale, int k0, int k1,
                                float (*os)[DA_MAXD], float* ms, float* ls, float* m_out, float* l_out, float* acc) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float neg_inf = -__int_as_float(0x7f800000);
    float m = neg_inf, l = 0.f, o[DA_DPL];
#pragma unroll
    for (int r = 0; r < DA_DPL; ++r) o[r] = 0.f;
    for (int s0 = k0 + warp * DA_TILE; s0 < k1; s0 += DA_WARPS * DA_TILE) {
        const int j = s0 + lane;
        const bool seen = j < k1;
        float sc = neg_inf;
        if (seen) {
            sc = dot_f32_bf16(qs, kc + ((seq_row + j) * Hkv + g) * D, D) * scale;
        }
        const float m_new = fmaxf(m, warp_max(sc));  // finite: lane 0's key is always seen
        const float p = seen ? expf(sc - m_new) : 0.f;
        const float corr = expf(m - m_new);  // 0 on the warp's first tile (m = −inf)
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int r = 0; r < DA_DPL; ++r) o[r] *= corr;
        const int cnt = min(DA_TILE, k1 - s0);
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
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < DA_WARPS; ++w) a += os[w][d] * wt[w];
        acc[d] = a;
    }
    *m_out = mx;
    *l_out = total;
}

// Variant 1 (see the header): one block per (head, query) over all of the query's keys.
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
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = __bfloat162float(q[((size_t)n * H + h) * D + d]);
    __syncthreads();
    float m, l;
    // The accumulator reuses warp 0's row of `os` once every warp has stored and been merged:
    // each thread reads os[w][d] for its own d before writing acc[d] = os[0][d].
    da_block_attend(qs, kc, vc, (size_t)seq[n] * slots, h / (H / Hkv), Hkv, D, scale, 0, pos[n] + 1, os, ms, ls, &m, &l,
                    os[0]);
    const float inv = 1.f / l;  // ≥ 1 term of exp(0): the warp holding the max
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[((size_t)n * H + h) * D + d] = __float2bfloat16(os[0][d] * inv);
}

// ---------------------------------------------------------------------------------------------
// Variant 2 (flash-decoding): the keys of each query are split into chunks of `chunk` positions
// (a multiple of 128), block (h, n, s) attends to chunk s and writes its unnormalised accumulator
// part_o[n, h, s, 0:D] and (max, sum) part_ml[n, h, s, 0:2] (fp32); decode_attn_combine merges the
// chunks. More blocks for a small batch (N·H below the SM count) at the price of a second launch.
extern "C" __global__ void __launch_bounds__(128) decode_attn_split(
    const bf16* __restrict__ q, const bf16* __restrict__ kc, const bf16* __restrict__ vc, const int* __restrict__ seq,
    const int* __restrict__ pos, int N, int slots, int H, int Hkv, int D, float scale, int chunk,
    float* __restrict__ part_o, float* __restrict__ part_ml) {
    __shared__ float qs[DA_MAXD];
    __shared__ float os[DA_WARPS][DA_MAXD];
    __shared__ float ms[DA_WARPS], ls[DA_WARPS];
    const int h = blockIdx.x, n = blockIdx.y, sp = blockIdx.z, splits = gridDim.z;
    if (n >= N) return;
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = __bfloat162float(q[((size_t)n * H + h) * D + d]);
    __syncthreads();
    const int len = pos[n] + 1;
    const int k0 = min(sp * chunk, len), k1 = min(k0 + chunk, len);
    const size_t part = ((size_t)n * H + h) * splits + sp;
    float m, l;
    da_block_attend(qs, kc, vc, (size_t)seq[n] * slots, h / (H / Hkv), Hkv, D, scale, k0, k1, os, ms, ls, &m, &l,
                    part_o + part * D);
    if (threadIdx.x == 0) {
        part_ml[2 * part] = m;
        part_ml[2 * part + 1] = l;
    }
}

// Merges the chunks of decode_attn_split: out = Σ_s e^{m_s − M}·acc_s / Σ_s e^{m_s − M}·l_s.
// grid (H, N), block 128. Chunk 0 always holds key 0, so M is finite.
extern "C" __global__ void decode_attn_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                               int N, int H, int D, int splits, bf16* __restrict__ out) {
    const int h = blockIdx.x, n = blockIdx.y;
    if (n >= N) return;
    const float neg_inf = -__int_as_float(0x7f800000);
    const size_t base = ((size_t)n * H + h) * splits;
    float mx = neg_inf;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_ml[2 * (base + s)]);
    float total = 0.f;
    for (int s = 0; s < splits; ++s) {
        const float ms_ = part_ml[2 * (base + s)];
        if (ms_ != neg_inf) total += part_ml[2 * (base + s) + 1] * expf(ms_ - mx);
    }
    const float inv = 1.f / total;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float ms_ = part_ml[2 * (base + s)];
            if (ms_ != neg_inf) a += part_o[(base + s) * D + d] * expf(ms_ - mx);
        }
        out[((size_t)n * H + h) * D + d] = __float2bfloat16(a * inv);
    }
}
