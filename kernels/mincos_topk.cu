// Fused min-cosine top-K (ARCHITECTURE.md §1, §4): the CUDA side of `ops::similarity::mincos_topk`.
//
// For every batch item b, test patches t[b] (P×C) and reference patches r[b] (P'×C), bf16:
//   s_i  = reduce_j cos(t_i, r_j)      reduce = max ("nearest", default) or min ("min", Eq. 1)
//   nn_i = the j that attains s_i      (lowest j among exact ties)
//   map_i = 1 − s_i, and the K patches with the lowest s_i (lowest first, ties by lower i).
// Zero-shot: r = t and j == i is excluded. A row whose candidates are all excluded gets s = 1,
// nn = 0 (as the CPU reference does). All-zero rows have cosine 0 with everything.
//
// The P×P' similarity matrix is never written to global memory: tiles of it live in registers
// and are reduced on the spot. Normalisation is folded into the epilogue:
// cos(t_i, r_j) = <t_i, r_j> · inv|t_i| · inv|r_j|, dot products on bf16 inputs with fp32
// accumulation, inverse norms in fp32 (more accurate than normalising into bf16 first).
//
// Launch sequence (host, per call):
//   1. mincos_inv_norms(test)  and  mincos_inv_norms(reference)   (skip the second zero-shot)
//   2. mincos_reduce_v2 (kept; C % 8 == 0 and 16-byte aligned rows) or mincos_reduce_v1 (any C)
//      grid (ceil(P/64), B, nsplit): each block reduces 64 test rows over one slice of the
//      reference rows and writes a partial (best, index) per row and split to a workspace
//      part_val/part_idx [nsplit, B, P]. nsplit > 1 splits P' across blocks when B·P/64 is too
//      small to fill the GPU.
//   3. mincos_merge_topk, grid B: merges the splits, writes sim/ref_index/map [B, P] and the
//      top-K [B, K] (entries past P are -1).
//   4. (optional) mincos_gather: v_sel = t[topk] and d = t[topk] − r[nn[topk]], [B, K, C] bf16,
//      the keys/values of the fusion attention (kernels/fusion_attn.cu).
//
// Variants (llm.c style): v1 SIMT fp32 tile, any C; v2 tensor cores (mma.sync m16n8k16 bf16,
// cp.async double buffering), the kept one.

#include "common.cuh"

#define REDUCE_NEAREST 0
#define REDUCE_MIN 1

// (value, index) is better than (best, arg): higher (nearest) or lower (min) value, and the lower
// index on an exact tie, so that every merge order gives the CPU reference's answer.
__device__ __forceinline__ bool mc_better(float v, int j, float best, int arg, int reduce) {
    if (v == best) return j < arg;
    return reduce == REDUCE_NEAREST ? v > best : v < best;
}

__device__ __forceinline__ float mc_worst(int reduce) {
    return reduce == REDUCE_NEAREST ? -__int_as_float(0x7f800000) : __int_as_float(0x7f800000);
}

// ---------------------------------------------------------------------------------------------
// 1. Inverse L2 norms, one warp per row: inv[r] = 1/|x_r| (0 for an all-zero row).
// grid ceil(rows/8), block 256.
extern "C" __global__ void mincos_inv_norms(const bf16* __restrict__ x, float* __restrict__ inv, int rows, int C) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    const bf16* row = x + (size_t)warp * C;
    float ss = 0.f;
    for (int c = lane; c < C; c += 32) {
        float v = __bfloat162float(row[c]);
        ss = fmaf(v, v, ss);
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) inv[warp] = ss > 0.f ? 1.0f / sqrtf(ss) : 0.f;
}

// The slice of reference rows that split `s` of `nsplit` reduces over: whole 64-row tiles.
__device__ __forceinline__ void mc_split_range(int Pr, int nsplit, int s, int* begin, int* end) {
    int tiles = (Pr + 63) / 64;
    int per = (tiles + nsplit - 1) / nsplit;
    int b = s * per * 64;
    int e = b + per * 64;
    *begin = b < Pr ? b : Pr;
    *end = e < Pr ? e : Pr;
}

// ---------------------------------------------------------------------------------------------
// 2a. Variant 1: SIMT tile. 256 threads as 16×16; a 64×64 tile, each thread 4×4 outputs at rows
// ty + 16·i and columns tx + 16·j, so that one row's 64 columns sit in 16 lanes of one warp.
// Any C, any alignment. grid (ceil(P/64), B, nsplit), block 256. (Without the min-blocks hint
// of 2, ptxas caps it at 64 registers for sm_80 and spills.)
#define V1_BK 16
extern "C" __global__ void __launch_bounds__(256, 2) mincos_reduce_v1(
    const bf16* __restrict__ test, const bf16* __restrict__ ref, const float* __restrict__ inv_t,
    const float* __restrict__ inv_r, int B, int P, int Pr, int C, int reduce, int zero_shot,
    float* __restrict__ part_val, int* __restrict__ part_idx) {
    __shared__ float As[V1_BK][64 + 1];
    __shared__ float Bs[V1_BK][64 + 1];
    const int b = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    const int m0 = blockIdx.x * 64;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const bf16* tb = test + (size_t)b * P * C;
    const bf16* rb = ref + (size_t)b * Pr * C;
    const float* itb = inv_t + (size_t)b * P;
    const float* irb = inv_r + (size_t)b * Pr;
    int nbeg, nend;
    mc_split_range(Pr, nsplit, split, &nbeg, &nend);

    float best[4];
    int arg[4];
    float rinv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        best[i] = mc_worst(reduce);
        arg[i] = 0;
        int gi = m0 + ty + 16 * i;
        rinv[i] = gi < P ? itb[gi] : 0.f;
    }

    for (int n0 = nbeg; n0 < nend; n0 += 64) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
        for (int k0 = 0; k0 < C; k0 += V1_BK) {
            // 64 rows × 16 k per operand: 1024 elements, 4 per thread; k fastest for coalescing.
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int idx = tid + e * 256;
                int row = idx / V1_BK, kk = idx % V1_BK;
                int gk = k0 + kk;
                int gi = m0 + row, gj = n0 + row;
                As[kk][row] = (gi < P && gk < C) ? __bfloat162float(tb[(size_t)gi * C + gk]) : 0.f;
                Bs[kk][row] = (gj < nend && gk < C) ? __bfloat162float(rb[(size_t)gj * C + gk]) : 0.f;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < V1_BK; ++kk) {
                float a[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
            }
            __syncthreads();
        }
        // Epilogue: scale to cosines and fold into the running (best, arg), columns ascending.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int gj = n0 + tx + 16 * j;
            if (gj >= nend) continue;
            float cinv = irb[gj];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int gi = m0 + ty + 16 * i;
                if (zero_shot && gi == gj) continue;
                float v = acc[i][j] * rinv[i] * cinv;
                if (mc_better(v, gj, best[i], arg[i], reduce)) {
                    best[i] = v;
                    arg[i] = gj;
                }
            }
        }
    }
    // Merge over the 16 lanes (tx) that share a row: lanes ty·16 .. ty·16+15 of one warp.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best[i], o);
            int oa = __shfl_xor_sync(0xffffffffu, arg[i], o);
            if (mc_better(ov, oa, best[i], arg[i], reduce)) {
                best[i] = ov;
                arg[i] = oa;
            }
        }
        int gi = m0 + ty + 16 * i;
        if (tx == 0 && gi < P) {
            size_t o = ((size_t)split * B + b) * P + gi;
            part_val[o] = best[i];
            part_idx[o] = arg[i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2b. Variant 2 (kept): tensor cores. common.cuh's tile (tc_tile_gemm: 4 warps as 2×2 over a
// 64×64 tile of test × reference, mma.sync.m16n8k16 bf16 → fp32, cp.async double buffering over
// k in steps of 32), reduced on the spot. Requires C % 8 == 0 and 16-byte aligned test/ref pointers.
// grid (ceil(P/64), B, nsplit), block 128.
extern "C" __global__ void __launch_bounds__(128) mincos_reduce_v2(
    const bf16* __restrict__ test, const bf16* __restrict__ ref, const float* __restrict__ inv_t,
    const float* __restrict__ inv_r, int B, int P, int Pr, int C, int reduce, int zero_shot,
    float* __restrict__ part_val, int* __restrict__ part_idx) {
    __shared__ __align__(16) bf16 As[2][TC_BM * TC_LD];
    __shared__ __align__(16) bf16 Bs[2][TC_BN * TC_LD];
    __shared__ float red_val[2][TC_BM];
    __shared__ int red_idx[2][TC_BM];

    const int b = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    const int m0 = blockIdx.x * TC_BM;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;  // warp tile: rows wm·32.., columns wn·32..
    const int g = lane >> 2, t = lane & 3;
    const bf16* tb = test + (size_t)b * P * C;
    const bf16* rb = ref + (size_t)b * Pr * C;
    const float* itb = inv_t + (size_t)b * P;
    const float* irb = inv_r + (size_t)b * Pr;
    int nbeg, nend;
    mc_split_range(Pr, nsplit, split, &nbeg, &nend);

    // This thread's 4 rows: local row wm·32 + mi·16 + g + 8h (h = 0, 1), index mi·2 + h.
    float best[4], rinv[4];
    int arg[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        int gi = m0 + wm * 32 + (r >> 1) * 16 + g + (r & 1) * 8;
        rinv[r] = gi < P ? itb[gi] : 0.f;
        best[r] = mc_worst(reduce);
        arg[r] = 0;
    }

    for (int n0 = nbeg; n0 < nend; n0 += TC_BN) {
        float acc[2][4][4];
        tc_tile_gemm(acc, tb, m0, P, rb, n0, nend, C, As, Bs);
        // Epilogue: columns ascending per thread (ni, then 2t, 2t+1).
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int gj = n0 + wn * 32 + ni * 8 + 2 * t + e;
                if (gj >= nend) continue;
                float cinv = irb[gj];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    int gi = m0 + wm * 32 + (r >> 1) * 16 + g + (r & 1) * 8;
                    if (zero_shot && gi == gj) continue;
                    float v = acc[r >> 1][ni][(r & 1) * 2 + e] * rinv[r] * cinv;
                    if (mc_better(v, gj, best[r], arg[r], reduce)) {
                        best[r] = v;
                        arg[r] = gj;
                    }
                }
            }
        }
    }
    // Merge over the quad (t = 0..3 share rows), then over the two column warps (wn).
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best[r], o);
            int oa = __shfl_xor_sync(0xffffffffu, arg[r], o);
            if (mc_better(ov, oa, best[r], arg[r], reduce)) {
                best[r] = ov;
                arg[r] = oa;
            }
        }
        if (t == 0) {
            int lr = wm * 32 + (r >> 1) * 16 + g + (r & 1) * 8;
            red_val[wn][lr] = best[r];
            red_idx[wn][lr] = arg[r];
        }
    }
    __syncthreads();
    if (tid < TC_BM) {
        int gi = m0 + tid;
        float v = red_val[0][tid];
        int a = red_idx[0][tid];
        if (mc_better(red_val[1][tid], red_idx[1][tid], v, a, reduce)) {
            v = red_val[1][tid];
            a = red_idx[1][tid];
        }
        if (gi < P) {
            size_t o = ((size_t)split * B + b) * P + gi;
            part_val[o] = v;
            part_idx[o] = a;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Merge the splits and select the K lowest. grid B, block 256 (any multiple of 32 ≤ 1024).
// Top-K by K rounds of a block-wide min over unique 64-bit keys (orderable(sim) << 32 | i): round
// r takes the smallest key above round r−1's, which yields sim ascending with ties by lower i.
__device__ __forceinline__ unsigned mc_orderable(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(1024) mincos_merge_topk(
    const float* __restrict__ part_val, const int* __restrict__ part_idx, int nsplit, int B, int P, int reduce,
    int K, float* sim, int* __restrict__ ref_index, float* __restrict__ amap, int* __restrict__ topk) {
    __shared__ unsigned long long warp_min[32];
    __shared__ unsigned long long chosen;
    const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    float* sb = sim + (size_t)b * P;
    for (int i = tid; i < P; i += blockDim.x) {
        float best = mc_worst(reduce);
        int arg = 0;
        for (int s = 0; s < nsplit; ++s) {
            size_t o = ((size_t)s * B + b) * P + i;
            if (mc_better(part_val[o], part_idx[o], best, arg, reduce)) {
                best = part_val[o];
                arg = part_idx[o];
            }
        }
        if (!isfinite(best)) {  // every candidate excluded (zero-shot with P = 1)
            best = 1.f;
            arg = 0;
        }
        sb[i] = best;
        ref_index[(size_t)b * P + i] = arg;
        amap[(size_t)b * P + i] = 1.f - best;
    }
    __syncthreads();  // this block's global writes are visible to the whole block after this
    const unsigned long long NONE = ~0ull;
    unsigned long long prev = 0;
    bool first = true;
    for (int r = 0; r < K; ++r) {
        unsigned long long m = NONE;
        for (int i = tid; i < P; i += blockDim.x) {
            unsigned long long key = ((unsigned long long)mc_orderable(sb[i]) << 32) | (unsigned)i;
            if ((first || key > prev) && key < m) m = key;
        }
        for (int o = 16; o > 0; o >>= 1) {
            unsigned long long x = __shfl_xor_sync(0xffffffffu, m, o);
            m = x < m ? x : m;
        }
        if (lane == 0) warp_min[warp] = m;
        __syncthreads();
        if (tid == 0) {
            unsigned long long mm = NONE;
            for (int w = 0; w < nwarps; ++w) mm = warp_min[w] < mm ? warp_min[w] : mm;
            chosen = mm;
            topk[(size_t)b * K + r] = mm == NONE ? -1 : (int)(unsigned)(mm & 0xffffffffu);
        }
        __syncthreads();
        prev = chosen;
        first = false;
        if (prev == NONE) {
            // Fewer than K patches: pad the rest with -1 (uniform branch: `chosen` is shared).
            for (int q = r + 1 + tid; q < K; q += blockDim.x) topk[(size_t)b * K + q] = -1;
            break;
        }
        __syncthreads();  // everyone read `chosen` before thread 0 overwrites it
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Gather the selected patches: v_sel[b,k] = t[b, topk[b,k]] and d[b,k] = t[b, i] − r[b, nn[b,i]]
// with i = topk[b,k] (fp32 difference, stored bf16). A -1 entry writes zeros. Zero-shot: pass
// ref = test. grid (K, B), block 128.
extern "C" __global__ void mincos_gather(const bf16* __restrict__ test, const bf16* __restrict__ ref,
                                         const int* __restrict__ topk, const int* __restrict__ ref_index, int P,
                                         int Pr, int C, int K, bf16* __restrict__ v_sel, bf16* __restrict__ d) {
    const int k = blockIdx.x, b = blockIdx.y;
    const int i = topk[(size_t)b * K + k];
    bf16* vs = v_sel + ((size_t)b * K + k) * C;
    bf16* dd = d + ((size_t)b * K + k) * C;
    if (i < 0) {
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            vs[c] = __float2bfloat16(0.f);
            dd[c] = __float2bfloat16(0.f);
        }
        return;
    }
    const int j = ref_index[(size_t)b * P + i];
    const bf16* tr = test + ((size_t)b * P + i) * C;
    const bf16* rr = ref + ((size_t)b * Pr + j) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float tv = __bfloat162float(tr[c]);
        vs[c] = tr[c];
        dd[c] = __float2bfloat16(tv - __bfloat162float(rr[c]));
    }
}
