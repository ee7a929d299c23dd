// The LLaMA decoder's sequence ops, forward and backward (ARCHITECTURE.md §4, issue 7): RoPE, causal
// grouped-query self-attention with an online softmax, and the token embedding. CPU references:
// ops::rope (RopeTable::apply_pairs_, apply_pairs_backward_), ops::attention (attention,
// attention_backward with Mask::Causal { start: 0 }), ops::embedding (embedding, embedding_backward).
//
// Layouts, per batch of B sequences of T positions (bf16 unless noted):
//   q [B, T, H, D], k, v [B, T, H_kv, D] (query head h reads kv head h / (H / H_kv)),
//   out [B, T, H, D], lse [B, H, T] (fp32, natural log).
// The attention core follows kernels/fusion_attn.cu (one warp per query row, lane per key of a
// 32-key tile, scores in registers, never a T×T matrix), adding the causal mask and the kv-head
// grouping. Its backward reuses `fusion_attn_bwd_delta` (delta = Σ dout·out, the same layout with
// L = T). Key tiles past a block's last query are skipped, so the causal forward does about half
// the work of a full one.
//
//   rope_pairs          x[b, t, head, 2i:2i+2] rotated by ±angle(t + start, i), in place
//                         grid ceil(rows·heads·D/2 / 256), block 256
//   causal_attn_fwd     grid (ceil(T/4), H, B), block 128, smem 32·(D+2)·2 + 32·D·2 + 4·D·4
//   causal_attn_bwd_dq  grid (ceil(T/4), H, B), block 128, smem 2·32·(D+2)·2 + 2·4·D·4
//   causal_attn_bwd_dkdv  grid (ceil(T/4), H_kv, B), block 128, smem 2·32·(D+2)·2 + 2·4·D·4 + 2·32·4;
//                         warp per key row of kv head g, summing over the group's query heads
//   embedding_fwd       out[r] = table[ids[r]]                  grid rows, block 128
//   embedding_bwd       dtable[tok_u] += Σ_{r in order[starts[u]..starts[u+1]]} dout[r]
//                         grid U (distinct tokens), block 128; the host sorts the positions by
//                         token, so every gradient row has one writer and a fixed summation order
// No atomics anywhere: results are deterministic. Limits: D even and ≤ 256.

#include "common.cuh"

#define CA_WARPS 4
#define CA_TILE 32
#define CA_DPL 8  // accumulators per lane: D ≤ 32 · CA_DPL

// ---------------------------------------------------------------------------------------------
// RoPE on interleaved pairs (the GGUF layout): for x [rows, heads, D] with position
// p = row % T + start, pair i of each head turns by angle p·θ_i (sign = +1) or back (sign = −1, the
// backward). cos/sin [max_pos, D/2] fp32, computed on the host exactly as ops::rope::RopeTable.
extern "C" __global__ void rope_pairs(bf16* __restrict__ x, const float* __restrict__ cos_t,
                                      const float* __restrict__ sin_t, int rows, int T, int heads, int D, int start,
                                      float sign) {
    const int half = D >> 1;
    const long long n = (long long)rows * heads * half;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int i = (int)(idx % half);
    const long long rh = idx / half;  // row · heads + head
    const int row = (int)(rh / heads);
    const int pos = row % T + start;
    const float c = cos_t[(size_t)pos * half + i], s = sign * sin_t[(size_t)pos * half + i];
    rotate_pair(x + rh * D + 2 * i, c, s);
}

// ---------------------------------------------------------------------------------------------
// Causal attention forward. One warp per query row i of head h; the block's 4 warps (queries
// i0..i0+3) share key/value tiles of kv head h / group. Query i sees keys 0..=i. Every tile the
// block loads starts at or before i0 (tiles are multiples of 32, i0 of 4), so each warp sees at
// least one key per tile and the running max stays finite.
extern "C" __global__ void __launch_bounds__(128) causal_attn_fwd(const bf16* __restrict__ q,
                                                                  const bf16* __restrict__ k,
                                                                  const bf16* __restrict__ v, int B, int T, int H,
                                                                  int Hkv, int D, float scale,
                                                                  bf16* __restrict__ out, float* __restrict__ lse) {
    extern __shared__ __align__(16) unsigned char ca_smem[];
    const int ldk = D + 2;
    bf16* Ks = reinterpret_cast<bf16*>(ca_smem);
    bf16* Vs = Ks + CA_TILE * ldk;
    float* qs = reinterpret_cast<float*>(Vs + CA_TILE * D);
    const int b = blockIdx.z, h = blockIdx.y, g = h / (H / Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i0 = blockIdx.x * CA_WARPS;
    const int i = i0 + warp;
    const bool live = i < T;
    const int last = min(T - 1, i0 + CA_WARPS - 1);  // the block's last query: keys past it are unseen
    float* qw = qs + warp * D;
    if (live)
        for (int d = lane; d < D; d += 32) qw[d] = __bfloat162float(q[head_row(b, i, h, T, H, D) + d]);

    float m = -__int_as_float(0x7f800000), l = 0.f, o[CA_DPL];
#pragma unroll
    for (int r = 0; r < CA_DPL; ++r) o[r] = 0.f;

    for (int s0 = 0; s0 <= last; s0 += CA_TILE) {
        __syncthreads();  // the previous tile is consumed (and qs written, first time)
        load_head_tile<CA_TILE>(Ks, ldk, k, b, s0, g, T, Hkv, D);
        load_head_tile<CA_TILE>(Vs, D, v, b, s0, g, T, Hkv, D);
        __syncthreads();
        if (!live) continue;
        const int j = s0 + lane;
        const bool seen = j <= i;  // implies j < T
        float sc = seen ? dot_f32_bf16(qw, Ks + lane * ldk, D) * scale : -__int_as_float(0x7f800000);
        float m_new = fmaxf(m, warp_max(sc));
        float p = seen ? expf(sc - m_new) : 0.f;
        float corr = expf(m - m_new);  // 0 on the first tile (m = −inf)
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int r = 0; r < CA_DPL; ++r) o[r] *= corr;
        const int n = min(CA_TILE, i - s0 + 1);
        for (int jj = 0; jj < n; ++jj) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const bf16* vr = Vs + jj * D;
#pragma unroll
            for (int r = 0; r < CA_DPL; ++r) {
                int d = r * 32 + lane;
                if (d < D) o[r] = fmaf(pj, __bfloat162float(vr[d]), o[r]);
            }
        }
        m = m_new;
    }
    if (!live) return;
    const float inv = 1.f / l;  // l ≥ 1: the max key contributes exp(0)
    bf16* orow = out + head_row(b, i, h, T, H, D);
#pragma unroll
    for (int r = 0; r < CA_DPL; ++r) {
        int d = r * 32 + lane;
        if (d < D) orow[d] = __float2bfloat16(o[r] * inv);
    }
    if (lane == 0) lse[((size_t)b * H + h) * T + i] = m + logf(l);
}

// ---------------------------------------------------------------------------------------------
// Backward, dq: one warp per query row, key/value tiles of its kv head shared by the block.
//   p_ij = exp(scale q_i·k_j − lse_i) (j ≤ i), ds_ij = p_ij (dout_i·v_j − delta_i),
//   dq_i = scale Σ_j ds_ij k_j.
extern "C" __global__ void __launch_bounds__(128) causal_attn_bwd_dq(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, int B, int T,
    int H, int Hkv, int D, float scale, bf16* __restrict__ dq) {
    extern __shared__ __align__(16) unsigned char ca_smem[];
    const int ld = D + 2;
    bf16* Ks = reinterpret_cast<bf16*>(ca_smem);
    bf16* Vs = Ks + CA_TILE * ld;
    float* qs = reinterpret_cast<float*>(Vs + CA_TILE * ld);
    float* dos = qs + CA_WARPS * D;
    const int b = blockIdx.z, h = blockIdx.y, g = h / (H / Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i0 = blockIdx.x * CA_WARPS;
    const int i = i0 + warp;
    const bool live = i < T;
    const int last = min(T - 1, i0 + CA_WARPS - 1);
    float* qw = qs + warp * D;
    float* dow = dos + warp * D;
    float lse_i = 0.f, delta_i = 0.f;
    if (live) {
        for (int d = lane; d < D; d += 32) {
            qw[d] = __bfloat162float(q[head_row(b, i, h, T, H, D) + d]);
            dow[d] = __bfloat162float(dout[head_row(b, i, h, T, H, D) + d]);
        }
        lse_i = lse[((size_t)b * H + h) * T + i];
        delta_i = delta[((size_t)b * H + h) * T + i];
    }
    float acc[CA_DPL];
#pragma unroll
    for (int r = 0; r < CA_DPL; ++r) acc[r] = 0.f;

    for (int s0 = 0; s0 <= last; s0 += CA_TILE) {
        __syncthreads();
        load_head_tile<CA_TILE>(Ks, ld, k, b, s0, g, T, Hkv, D);
        load_head_tile<CA_TILE>(Vs, ld, v, b, s0, g, T, Hkv, D);
        __syncthreads();
        if (!live) continue;
        const int j = s0 + lane;
        float ds = 0.f;
        if (j <= i) {
            float p = expf(dot_f32_bf16(qw, Ks + lane * ld, D) * scale - lse_i);
            float dp = dot_f32_bf16(dow, Vs + lane * ld, D);
            ds = p * (dp - delta_i);
        }
        const int n = min(CA_TILE, i - s0 + 1);
        for (int jj = 0; jj < n; ++jj) {
            float dsj = __shfl_sync(0xffffffffu, ds, jj);
            const bf16* kr = Ks + jj * ld;
#pragma unroll
            for (int r = 0; r < CA_DPL; ++r) {
                int d = r * 32 + lane;
                if (d < D) acc[r] = fmaf(dsj, __bfloat162float(kr[d]), acc[r]);
            }
        }
    }
    if (!live) return;
    bf16* row = dq + head_row(b, i, h, T, H, D);
#pragma unroll
    for (int r = 0; r < CA_DPL; ++r) {
        int d = r * 32 + lane;
        if (d < D) row[d] = __float2bfloat16(acc[r] * scale);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dk and dv: one warp per key row j of kv head g; over each query head of the group and
// the query tiles that can see j (i ≥ j), dk_j = scale Σ_i ds_ij q_i, dv_j = Σ_i p_ij dout_i.
// The block's keys are j0..j0+3, so its first query tile starts at the tile holding j0.
extern "C" __global__ void __launch_bounds__(128) causal_attn_bwd_dkdv(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, int B, int T,
    int H, int Hkv, int D, float scale, bf16* __restrict__ dk, bf16* __restrict__ dv) {
    extern __shared__ __align__(16) unsigned char ca_smem[];
    const int ld = D + 2;
    bf16* Qs = reinterpret_cast<bf16*>(ca_smem);
    bf16* Ds = Qs + CA_TILE * ld;
    float* ks = reinterpret_cast<float*>(Ds + CA_TILE * ld);
    float* vs = ks + CA_WARPS * D;
    float* lse_s = vs + CA_WARPS * D;
    float* delta_s = lse_s + CA_TILE;
    const int b = blockIdx.z, g = blockIdx.y, group = H / Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j0 = blockIdx.x * CA_WARPS;
    const int j = j0 + warp;
    const bool live = j < T;
    float* kw = ks + warp * D;
    float* vw = vs + warp * D;
    if (live)
        for (int d = lane; d < D; d += 32) {
            kw[d] = __bfloat162float(k[head_row(b, j, g, T, Hkv, D) + d]);
            vw[d] = __bfloat162float(v[head_row(b, j, g, T, Hkv, D) + d]);
        }
    float gk[CA_DPL], gv[CA_DPL];
#pragma unroll
    for (int r = 0; r < CA_DPL; ++r) gk[r] = gv[r] = 0.f;

    const int first = (j0 / CA_TILE) * CA_TILE;
    for (int h = g * group; h < (g + 1) * group; ++h) {
        const float* lse_bh = lse + ((size_t)b * H + h) * T;
        const float* delta_bh = delta + ((size_t)b * H + h) * T;
        for (int i0 = first; i0 < T; i0 += CA_TILE) {
            __syncthreads();
            load_head_tile<CA_TILE>(Qs, ld, q, b, i0, h, T, H, D);
            load_head_tile<CA_TILE>(Ds, ld, dout, b, i0, h, T, H, D);
            for (int r = threadIdx.x; r < CA_TILE; r += blockDim.x) {
                lse_s[r] = i0 + r < T ? lse_bh[i0 + r] : 0.f;
                delta_s[r] = i0 + r < T ? delta_bh[i0 + r] : 0.f;
            }
            __syncthreads();
            if (!live) continue;
            const int i = i0 + lane;
            float p = 0.f, ds = 0.f;
            if (i < T && i >= j) {
                p = expf(dot_f32_bf16(kw, Qs + lane * ld, D) * scale - lse_s[lane]);
                float dp = dot_f32_bf16(vw, Ds + lane * ld, D);
                ds = p * (dp - delta_s[lane]);
            }
            const int lo = max(0, j - i0), hi = min(CA_TILE, T - i0);
            for (int ii = lo; ii < hi; ++ii) {
                float pi = __shfl_sync(0xffffffffu, p, ii);
                float dsi = __shfl_sync(0xffffffffu, ds, ii);
                const bf16* qr = Qs + ii * ld;
                const bf16* dr = Ds + ii * ld;
#pragma unroll
                for (int r = 0; r < CA_DPL; ++r) {
                    int d = r * 32 + lane;
                    if (d < D) {
                        gv[r] = fmaf(pi, __bfloat162float(dr[d]), gv[r]);
                        gk[r] = fmaf(dsi, __bfloat162float(qr[d]), gk[r]);
                    }
                }
            }
        }
    }
    if (!live) return;
    bf16* dkr = dk + head_row(b, j, g, T, Hkv, D);
    bf16* dvr = dv + head_row(b, j, g, T, Hkv, D);
#pragma unroll
    for (int r = 0; r < CA_DPL; ++r) {
        int d = r * 32 + lane;
        if (d < D) {
            dkr[d] = __float2bfloat16(gk[r] * scale);
            dvr[d] = __float2bfloat16(gv[r]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Token embedding: out[r, :] = table[ids[r], :]. One block per row.
extern "C" __global__ void embedding_fwd(const bf16* __restrict__ table, const int* __restrict__ ids, int rows, int C,
                                         bf16* __restrict__ out) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* src = table + (size_t)ids[r] * C;
    bf16* dst = out + (size_t)r * C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) dst[j] = src[j];
}

// Embedding backward: block u owns table row tokens[u] and adds the rows order[starts[u]] ..
// order[starts[u+1] − 1] of dout to it, in that order (fp32 sum, one bf16 rounding).
extern "C" __global__ void embedding_bwd(const bf16* __restrict__ dout, const int* __restrict__ order,
                                         const int* __restrict__ starts, const int* __restrict__ tokens, int U, int C,
                                         bf16* __restrict__ dtable) {
    const int u = blockIdx.x;
    if (u >= U) return;
    const int a = starts[u], e = starts[u + 1];
    bf16* dst = dtable + (size_t)tokens[u] * C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        float acc = __bfloat162float(dst[j]);
        for (int p = a; p < e; ++p) acc += __bfloat162float(dout[(size_t)order[p] * C + j]);
        dst[j] = __float2bfloat16(acc);
    }
}
