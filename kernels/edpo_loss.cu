// Fused E-DPO loss (ARCHITECTURE.md §1, §4): the CUDA side of `ops::edpo`.
//
// Sequences n = 0..N−1 (the chosen and rejected answers of all pairs, each prompt + answer, T
// positions), hidden states h [N, T, C] and LM-head weight W [V, C] (bf16). Position t predicts
// targets[n, t] (already shifted: the token at t+1) and counts where mask[n, t] = 1 (answer
// tokens). Per token, with z = h·Wᵀ (fp32 accumulation):
//   lse = log Σ_v exp(z_v),  logp = z_target − lse,  seq_logp[n] = Σ_t mask · logp
// Per pair p (chosen c, rejected r, ΔH = H(a_c) − H(a_r)), with π = policy and ρ = reference:
//   d_p = β[(π_c − ρ_c) − (π_r − ρ_r)] − η|ΔH_p|,  loss = mean_p −log σ(d_p)
//   g_p = ∂loss/∂d_p = −σ(−d_p)/P;  grad_seq[n] = ∂loss/∂π_n = β Σ_{p: c_p = n} g_p − β Σ_{p: r_p = n} g_p
// (an answer may sit in two pairs — the ΔH_max and ΔH_min pairs of one instance).
// Gradient: ∂loss/∂z_v = g_t (1[v = target] − softmax_v), g_t = grad_seq[n] · mask[n, t];
//   ∂loss/∂h_t = Σ_v ∂z_v · W_v,   ∂loss/∂W_v = Σ_t ∂z_{t,v} · h_t.
//
// The [N, T, V] logits and log-probabilities are never materialised:
//   forward   edpo_logits_lse_partial   grid (ceil(N·T/64), nsplit), block 128: tensor-core tiles
//               of h·Wᵀ reduced on the spot into an online (max, sum) per row and vocabulary split,
//               plus the target logit. Tiles of 64 rows that are all masked are skipped.
//             edpo_lse_combine_seqsum   grid N, block 256: merges the splits → lse, logp [N, T]
//               and seq_logp [N] (fixed-order reduction: deterministic).
//             (run both on the reference model's h and W, once, for ρ; no gradient)
//             edpo_loss_fwd             grid 1, block 256: margins, per-pair losses, mean loss and
//               grad_seq [N].
//   backward  edpo_dlogits              grid (ceil(rows/64), ceil(V/64)), block 128, for one chunk
//               of rows [r0, r0 + rows): recomputes the logits tile by tile and writes only
//               ∂loss/∂z (bf16) for that chunk, [rows, V]. The host then runs two cuBLASLt GEMMs
//               per chunk, dH[chunk] = dz·W and dW += dzᵀ·H[chunk], so peak extra memory is
//               rows × V × 2 bytes (one answer span, or 1024 rows, at a time) instead of
//               N × T × V × 4. Chunks that cover only answer positions waste nothing.
// GEMM tiles: common.cuh's tc_tile_gemm (4 warps as 2×2 over a 64×64 tile, mma.sync m16n8k16
// bf16 → fp32, cp.async double buffering over k in steps of 32; the tile of kernels/mincos_topk.cu
// v2). Requires C % 8 == 0 and 16-byte aligned h and W.

#include "common.cuh"

__device__ __forceinline__ float ed_neg_inf() { return -__int_as_float(0x7f800000); }

// Merges the online-softmax state (m2, s2) into (m, s).
__device__ __forceinline__ void ed_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == ed_neg_inf()) return;  // both empty
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// True when some row of [r0, r0 + 64) ∩ [0, R) is unmasked (block-uniform).
__device__ __forceinline__ bool ed_tile_live(const unsigned char* mask, int r0, int R) {
    int r = r0 + (int)threadIdx.x;
    int live = threadIdx.x < TC_BM && r < R && (mask == nullptr || mask[r] != 0);
    return __syncthreads_or(live) != 0;
}

// ---------------------------------------------------------------------------------------------
// Forward 1: per row and vocabulary split, the online (max, sum exp) and the target's logit.
// R = N·T rows of h; part_max/part_sum [nsplit, R]; tgt_logit [R] (written by the one split that
// holds the target). Fully masked tiles write nothing (the combine never reads them).
extern "C" __global__ void __launch_bounds__(128) edpo_logits_lse_partial(
    const bf16* __restrict__ hidden, const bf16* __restrict__ w, const int* __restrict__ targets,
    const unsigned char* __restrict__ mask, int R, int V, int C, float* __restrict__ part_max,
    float* __restrict__ part_sum, float* __restrict__ tgt_logit) {
    __shared__ __align__(16) bf16 As[2][TC_BM * TC_LD];
    __shared__ __align__(16) bf16 Bs[2][TC_BN * TC_LD];
    __shared__ float red_m[2][TC_BM], red_s[2][TC_BM];
    const int m0 = blockIdx.x * TC_BM, split = blockIdx.y, nsplit = gridDim.y;
    if (!ed_tile_live(mask, m0, R)) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
    // This split's vocabulary range, whole 64-column tiles.
    const int vt = (V + TC_BN - 1) / TC_BN, per = (vt + nsplit - 1) / nsplit;
    const int vbeg = min(split * per * TC_BN, V), vend = min((split + 1) * per * TC_BN, V);

    float m[4], s[4];
    int tgt[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        int gr = m0 + wm * 32 + (r >> 1) * 16 + g + (r & 1) * 8;
        m[r] = ed_neg_inf();
        s[r] = 0.f;
        tgt[r] = gr < R ? targets[gr] : -1;
    }
    float acc[2][4][4];
    for (int n0 = vbeg; n0 < vend; n0 += TC_BN) {
        tc_tile_gemm(acc, hidden, m0, R, w, n0, vend, C, As, Bs);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int gr = m0 + wm * 32 + (r >> 1) * 16 + g + (r & 1) * 8;
            float tmax = ed_neg_inf();
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    int gv = n0 + wn * 32 + ni * 8 + 2 * t + e;
                    if (gv < vend) {
                        float z = acc[r >> 1][ni][(r & 1) * 2 + e];
                        tmax = fmaxf(tmax, z);
                        if (gv == tgt[r] && gr < R) tgt_logit[gr] = z;
                    }
                }
            if (tmax == ed_neg_inf()) continue;
            float mn = fmaxf(m[r], tmax);
            float sum = s[r] * expf(m[r] - mn);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    int gv = n0 + wn * 32 + ni * 8 + 2 * t + e;
                    if (gv < vend) sum += expf(acc[r >> 1][ni][(r & 1) * 2 + e] - mn);
                }
            m[r] = mn;
            s[r] = sum;
        }
    }
    // Merge over the quad, then over the two column warps.
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m[r], o);
            float s2 = __shfl_xor_sync(0xffffffffu, s[r], o);
            ed_merge(m[r], s[r], m2, s2);
        }
        if (t == 0) {
            int lr = wm * 32 + (r >> 1) * 16 + g + (r & 1) * 8;
            red_m[wn][lr] = m[r];
            red_s[wn][lr] = s[r];
        }
    }
    __syncthreads();
    if (tid < TC_BM && m0 + tid < R) {
        float mm = red_m[0][tid], ss = red_s[0][tid];
        ed_merge(mm, ss, red_m[1][tid], red_s[1][tid]);
        part_max[(size_t)split * R + m0 + tid] = mm;
        part_sum[(size_t)split * R + m0 + tid] = ss;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward 2: lse, logp [N·T] (0 at masked positions) and seq_logp [N]. grid N, block 256.
extern "C" __global__ void __launch_bounds__(256) edpo_lse_combine_seqsum(
    const float* __restrict__ part_max, const float* __restrict__ part_sum, const float* __restrict__ tgt_logit,
    const unsigned char* __restrict__ mask, int nsplit, int N, int T, float* __restrict__ lse,
    float* __restrict__ logp, float* __restrict__ seq_logp) {
    __shared__ float red[256];
    const int n = blockIdx.x, tid = threadIdx.x;
    const int R = N * T;
    float acc = 0.f;
    for (int t = tid; t < T; t += blockDim.x) {
        const int row = n * T + t;
        float l = 0.f, lp = 0.f;
        if (mask == nullptr || mask[row]) {
            float m = ed_neg_inf(), s = 0.f;
            for (int k = 0; k < nsplit; ++k) ed_merge(m, s, part_max[(size_t)k * R + row], part_sum[(size_t)k * R + row]);
            l = m + logf(s);
            lp = tgt_logit[row] - l;
            acc += lp;
        }
        lse[row] = l;
        logp[row] = lp;
    }
    red[tid] = acc;
    __syncthreads();
    for (int o = blockDim.x >> 1; o > 0; o >>= 1) {  // blockDim.x a power of two
        if (tid < o) red[tid] += red[tid + o];
        __syncthreads();
    }
    if (tid == 0) seq_logp[n] = red[0];
}

// ---------------------------------------------------------------------------------------------
// Forward 3: margins, per-pair losses, mean loss, and ∂loss/∂seq_logp for the policy.
// grid 1, block 256. Serial sums in a fixed order: deterministic.
__device__ __forceinline__ float ed_softplus(float x) {  // log(1 + e^x), stable
    return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x)));
}
__device__ __forceinline__ float ed_sigmoid(float x) {
    return x >= 0.f ? 1.f / (1.f + expf(-x)) : expf(x) / (1.f + expf(x));
}

extern "C" __global__ void __launch_bounds__(256) edpo_loss_fwd(
    const float* __restrict__ pol_seq, const float* __restrict__ ref_seq, const int* __restrict__ chosen,
    const int* __restrict__ rejected, const float* __restrict__ delta_h, int P, int N, float beta, float eta,
    float* __restrict__ margin, float* __restrict__ loss_pair, float* __restrict__ dloss_dmargin,
    float* __restrict__ loss, float* __restrict__ grad_seq) {
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        int c = chosen[p], r = rejected[p];
        float d = beta * ((pol_seq[c] - ref_seq[c]) - (pol_seq[r] - ref_seq[r])) - eta * fabsf(delta_h[p]);
        margin[p] = d;
        loss_pair[p] = ed_softplus(-d);               // −log σ(d)
        dloss_dmargin[p] = -ed_sigmoid(-d) / (float)P;  // of the mean
    }
    __syncthreads();
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        float gsum = 0.f;
        for (int p = 0; p < P; ++p) {
            if (chosen[p] == n) gsum += beta * dloss_dmargin[p];
            if (rejected[p] == n) gsum -= beta * dloss_dmargin[p];
        }
        grad_seq[n] = gsum;
    }
    if (threadIdx.x == 0) {
        float l = 0.f;
        for (int p = 0; p < P; ++p) l += loss_pair[p];
        loss[0] = P > 0 ? l / (float)P : 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward: ∂loss/∂z for rows [r0, r0 + rows) of the flattened [N·T] positions, written bf16 to
// dz [rows, V]: dz = g (1[v = target] − exp(z − lse)), g = grad_seq[row / T] · mask[row].
// Fully masked 64-row tiles write zeros without the GEMM. grid (ceil(rows/64), ceil(V/64)),
// block 128.
extern "C" __global__ void __launch_bounds__(128) edpo_dlogits(
    const bf16* __restrict__ hidden, const bf16* __restrict__ w, const int* __restrict__ targets,
    const unsigned char* __restrict__ mask, const float* __restrict__ lse, const float* __restrict__ grad_seq,
    int r0, int rows, int T, int V, int C, bf16* __restrict__ dz) {
    __shared__ __align__(16) bf16 As[2][TC_BM * TC_LD];
    __shared__ __align__(16) bf16 Bs[2][TC_BN * TC_LD];
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
    const bf16* hc = hidden + (size_t)r0 * C;  // this chunk's first row
    if (!ed_tile_live(mask == nullptr ? nullptr : mask + r0, m0, rows)) {
        for (int idx = tid; idx < TC_BM * TC_BN; idx += blockDim.x) {
            int lr = m0 + idx / TC_BN, v = n0 + idx % TC_BN;
            if (lr < rows && v < V) dz[(size_t)lr * V + v] = __float2bfloat16(0.f);
        }
        return;
    }
    float acc[2][4][4];
    tc_tile_gemm(acc, hc, m0, rows, w, n0, V, C, As, Bs);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int lr = m0 + wm * 32 + (r >> 1) * 16 + g + (r & 1) * 8;
        if (lr >= rows) continue;
        const int row = r0 + lr;
        const bool on = mask == nullptr || mask[row] != 0;
        const float gr = on ? grad_seq[row / T] : 0.f;
        const float l = on ? lse[row] : 0.f;
        const int y = on ? targets[row] : -1;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int v = n0 + wn * 32 + ni * 8 + 2 * t + e;
                if (v >= V) continue;
                float d = on ? gr * ((v == y ? 1.f : 0.f) - expf(acc[r >> 1][ni][(r & 1) * 2 + e] - l)) : 0.f;
                dz[(size_t)lr * V + v] = __float2bfloat16(d);
            }
    }
}
