// Multi-head fusion (cross-)attention, forward and backward (ARCHITECTURE.md §1, §4): the CUDA side of
// `ops::fusion_attn`.
//
// Queries are the L fact vectors, keys/values the S (= K) selected patches, per sample b and head h:
//   q [B, L, H, D], k [B, S, H, D], v [B, S, H, D], out [B, L, H, D] (bf16)
//   out_i = Σ_j softmax_j(scale · q_i·k_j) v_j,   lse [B, H, L] = log Σ_j exp(scale · q_i·k_j) (fp32)
// The Wq/Wk/Wv/out projections are GEMMs (cuBLASLt, host side); these kernels are the attention
// core. The L×S score matrix is never stored: scores live in registers, one key (forward, dq) or one
// query (dk/dv) per lane, with an online softmax over key tiles of 32 in the forward.
//
// Backward, given dout and the forward's out and lse:
//   delta_i = dout_i·out_i                                   fusion_attn_bwd_delta
//   p_ij = exp(scale q_i·k_j − lse_i), dp_ij = dout_i·v_j, ds_ij = p_ij (dp_ij − delta_i)
//   dq_i = scale Σ_j ds_ij k_j                                fusion_attn_bwd_dq   (warp per query)
//   dk_j = scale Σ_i ds_ij q_i,  dv_j = Σ_i p_ij dout_i       fusion_attn_bwd_dkdv (warp per key)
// No atomics: every gradient row is owned by one warp, so results are deterministic.
//
// Limits: D even and ≤ 256 (8 fp32 accumulators per lane). Dynamic shared memory per block:
//   fwd:  32·(D+2)·2 + 32·D·2 + 4·D·4 bytes           (D = 128: 18.9 KB; D = 256: 37.6 KB)
//   dq:   2·32·(D+2)·2 + 2·4·D·4 bytes                 (D = 128: 20.7 KB)
//   dkdv: 2·32·(D+2)·2 + 2·4·D·4 + 2·32·4 bytes        (D = 128: 21.0 KB)
// all under the 48 KB default for D ≤ 256.
// Launch: fwd and dq grid (ceil(L/4), H, B); dkdv grid (ceil(S/4), H, B); delta grid
// (ceil(B·L·H/8)); block 128 (delta: 256).

#include "common.cuh"

#define FA_WARPS 4
#define FA_TILE 32
#define FA_DPL 8  // accumulators per lane: D ≤ 32 · FA_DPL

// ---------------------------------------------------------------------------------------------
// Forward. One warp per query row; the block's 4 warps share the key/value tiles of one (b, h).
extern "C" __global__ void __launch_bounds__(128) fusion_attn_fwd(const bf16* __restrict__ q,
                                                                  const bf16* __restrict__ k,
                                                                  const bf16* __restrict__ v, int B, int L, int S,
                                                                  int H, int D, float scale, bf16* __restrict__ out,
                                                                  float* __restrict__ lse) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    const int ldk = D + 2;  // odd word stride for D % 4 == 0: lane-per-key reads are conflict free
    bf16* Ks = reinterpret_cast<bf16*>(fa_smem);
    bf16* Vs = Ks + FA_TILE * ldk;
    float* qs = reinterpret_cast<float*>(Vs + FA_TILE * D);
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * FA_WARPS + warp;
    const bool live = i < L;
    float* qw = qs + warp * D;
    if (live)
        for (int d = lane; d < D; d += 32) qw[d] = __bfloat162float(q[head_row(b, i, h, L, H, D) + d]);

    float m = -__int_as_float(0x7f800000), l = 0.f, o[FA_DPL];
#pragma unroll
    for (int r = 0; r < FA_DPL; ++r) o[r] = 0.f;

    for (int s0 = 0; s0 < S; s0 += FA_TILE) {
        __syncthreads();  // the previous tile is consumed (and qs written, first time)
        load_head_tile<FA_TILE>(Ks, ldk, k, b, s0, h, S, H, D);
        load_head_tile<FA_TILE>(Vs, D, v, b, s0, h, S, H, D);
        __syncthreads();
        if (!live) continue;
        const int j = s0 + lane;
        const int n = min(FA_TILE, S - s0);
        float sc = j < S ? dot_f32_bf16(qw, Ks + lane * ldk, D) * scale : -__int_as_float(0x7f800000);
        float m_new = fmaxf(m, warp_max(sc));  // finite: the tile has at least one key
        float p = j < S ? expf(sc - m_new) : 0.f;
        float corr = expf(m - m_new);  // 0 on the first tile (m = −inf)
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int r = 0; r < FA_DPL; ++r) o[r] *= corr;
        for (int jj = 0; jj < n; ++jj) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const bf16* vr = Vs + jj * D;
#pragma unroll
            for (int r = 0; r < FA_DPL; ++r) {
                int d = r * 32 + lane;
                if (d < D) o[r] = fmaf(pj, __bfloat162float(vr[d]), o[r]);
            }
        }
        m = m_new;
    }
    if (!live) return;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    bf16* orow = out + head_row(b, i, h, L, H, D);
#pragma unroll
    for (int r = 0; r < FA_DPL; ++r) {
        int d = r * 32 + lane;
        if (d < D) orow[d] = __float2bfloat16(o[r] * inv);
    }
    if (lane == 0) lse[((size_t)b * H + h) * L + i] = S > 0 ? m + logf(l) : -__int_as_float(0x7f800000);
}

// ---------------------------------------------------------------------------------------------
// Backward 1: delta [B, H, L] = Σ_d dout·out, one warp per (b, i, h) row.
extern "C" __global__ void fusion_attn_bwd_delta(const bf16* __restrict__ out, const bf16* __restrict__ dout, int B,
                                                 int L, int H, int D, float* __restrict__ delta) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // (b·L + i)·H + h
    const int lane = threadIdx.x & 31;
    if (row >= B * L * H) return;
    const size_t base = (size_t)row * D;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32)
        acc = fmaf(__bfloat162float(out[base + d]), __bfloat162float(dout[base + d]), acc);
    acc = warp_sum(acc);
    const int h = row % H, bi = row / H, i = bi % L, b = bi / L;
    if (lane == 0) delta[((size_t)b * H + h) * L + i] = acc;
}

// ---------------------------------------------------------------------------------------------
// Backward 2: dq, one warp per query row, key/value tiles shared by the block.
extern "C" __global__ void __launch_bounds__(128) fusion_attn_bwd_dq(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, int B, int L,
    int S, int H, int D, float scale, bf16* __restrict__ dq) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    const int ld = D + 2;
    bf16* Ks = reinterpret_cast<bf16*>(fa_smem);
    bf16* Vs = Ks + FA_TILE * ld;
    float* qs = reinterpret_cast<float*>(Vs + FA_TILE * ld);
    float* dos = qs + FA_WARPS * D;
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * FA_WARPS + warp;
    const bool live = i < L;
    float* qw = qs + warp * D;
    float* dow = dos + warp * D;
    float lse_i = 0.f, delta_i = 0.f;
    if (live) {
        for (int d = lane; d < D; d += 32) {
            qw[d] = __bfloat162float(q[head_row(b, i, h, L, H, D) + d]);
            dow[d] = __bfloat162float(dout[head_row(b, i, h, L, H, D) + d]);
        }
        lse_i = lse[((size_t)b * H + h) * L + i];
        delta_i = delta[((size_t)b * H + h) * L + i];
    }
    float acc[FA_DPL];
#pragma unroll
    for (int r = 0; r < FA_DPL; ++r) acc[r] = 0.f;

    for (int s0 = 0; s0 < S; s0 += FA_TILE) {
        __syncthreads();
        load_head_tile<FA_TILE>(Ks, ld, k, b, s0, h, S, H, D);
        load_head_tile<FA_TILE>(Vs, ld, v, b, s0, h, S, H, D);
        __syncthreads();
        if (!live) continue;
        const int j = s0 + lane;
        const int n = min(FA_TILE, S - s0);
        float ds = 0.f;
        if (j < S) {
            float p = expf(dot_f32_bf16(qw, Ks + lane * ld, D) * scale - lse_i);
            float dp = dot_f32_bf16(dow, Vs + lane * ld, D);
            ds = p * (dp - delta_i);
        }
        for (int jj = 0; jj < n; ++jj) {
            float dsj = __shfl_sync(0xffffffffu, ds, jj);
            const bf16* kr = Ks + jj * ld;
#pragma unroll
            for (int r = 0; r < FA_DPL; ++r) {
                int d = r * 32 + lane;
                if (d < D) acc[r] = fmaf(dsj, __bfloat162float(kr[d]), acc[r]);
            }
        }
    }
    if (!live) return;
    bf16* row = dq + head_row(b, i, h, L, H, D);
#pragma unroll
    for (int r = 0; r < FA_DPL; ++r) {
        int d = r * 32 + lane;
        if (d < D) row[d] = __float2bfloat16(acc[r] * scale);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 3: dk and dv, one warp per key row, query/dout tiles (and their lse, delta) shared.
extern "C" __global__ void __launch_bounds__(128) fusion_attn_bwd_dkdv(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, int B, int L,
    int S, int H, int D, float scale, bf16* __restrict__ dk, bf16* __restrict__ dv) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    const int ld = D + 2;
    bf16* Qs = reinterpret_cast<bf16*>(fa_smem);
    bf16* Ds = Qs + FA_TILE * ld;
    float* ks = reinterpret_cast<float*>(Ds + FA_TILE * ld);
    float* vs = ks + FA_WARPS * D;
    float* lse_s = vs + FA_WARPS * D;
    float* delta_s = lse_s + FA_TILE;
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * FA_WARPS + warp;
    const bool live = j < S;
    float* kw = ks + warp * D;
    float* vw = vs + warp * D;
    if (live)
        for (int d = lane; d < D; d += 32) {
            kw[d] = __bfloat162float(k[head_row(b, j, h, S, H, D) + d]);
            vw[d] = __bfloat162float(v[head_row(b, j, h, S, H, D) + d]);
        }
    float gk[FA_DPL], gv[FA_DPL];
#pragma unroll
    for (int r = 0; r < FA_DPL; ++r) gk[r] = gv[r] = 0.f;

    const float* lse_bh = lse + ((size_t)b * H + h) * L;
    const float* delta_bh = delta + ((size_t)b * H + h) * L;
    for (int i0 = 0; i0 < L; i0 += FA_TILE) {
        __syncthreads();
        load_head_tile<FA_TILE>(Qs, ld, q, b, i0, h, L, H, D);
        load_head_tile<FA_TILE>(Ds, ld, dout, b, i0, h, L, H, D);
        for (int r = threadIdx.x; r < FA_TILE; r += blockDim.x) {
            lse_s[r] = i0 + r < L ? lse_bh[i0 + r] : 0.f;
            delta_s[r] = i0 + r < L ? delta_bh[i0 + r] : 0.f;
        }
        __syncthreads();
        if (!live) continue;
        const int i = i0 + lane;
        const int n = min(FA_TILE, L - i0);
        float p = 0.f, ds = 0.f;
        if (i < L) {
            p = expf(dot_f32_bf16(kw, Qs + lane * ld, D) * scale - lse_s[lane]);
            float dp = dot_f32_bf16(vw, Ds + lane * ld, D);
            ds = p * (dp - delta_s[lane]);
        }
        for (int ii = 0; ii < n; ++ii) {
            float pi = __shfl_sync(0xffffffffu, p, ii);
            float dsi = __shfl_sync(0xffffffffu, ds, ii);
            const bf16* qr = Qs + ii * ld;
            const bf16* dr = Ds + ii * ld;
#pragma unroll
            for (int r = 0; r < FA_DPL; ++r) {
                int d = r * 32 + lane;
                if (d < D) {
                    gv[r] = fmaf(pi, __bfloat162float(dr[d]), gv[r]);
                    gk[r] = fmaf(dsi, __bfloat162float(qr[d]), gk[r]);
                }
            }
        }
    }
    if (!live) return;
    bf16* dkr = dk + head_row(b, j, h, S, H, D);
    bf16* dvr = dv + head_row(b, j, h, S, H, D);
#pragma unroll
    for (int r = 0; r < FA_DPL; ++r) {
        int d = r * 32 + lane;
        if (d < D) {
            dkr[d] = __float2bfloat16(gk[r] * scale);
            dvr[d] = __float2bfloat16(gv[r]);
        }
    }
}
