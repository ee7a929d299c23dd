// The helpers every kernels/*.cu shares: one definition each, so a fix to a reduction or to the
// tensor-core tile reaches every kernel that uses it.
//
// NVRTC gets this file as an embedded header (`src/backend/cuda/kernels.rs`, HEADERS), so the
// binary compiles the kernels without the source tree, and the PTX cache key covers it: a change
// here recompiles every kernel. The CPU emulation (tests/emu/emu.h, tests/common/emu.rs) pastes
// this file into each kernel and replaces the inline-PTX helpers (cp_async16, cp_async_commit,
// cp_async_wait, mma_16816) with its own definitions; any other `asm` here needs one there too.
#ifndef SAGE_KERNELS_COMMON_CUH
#define SAGE_KERNELS_COMMON_CUH

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------------------------------------
// Warp reductions: butterfly over the 32 lanes, every lane ends with the result. The order of
// the additions is fixed (offsets 16, 8, 4, 2, 1), so a sum is the same on every run.
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// ---------------------------------------------------------------------------------------------
// Attention tiles (fusion_attn.cu, llm_attn.cu, llm_decode.cu): per-head rows of [B, N, H, D].

// Row (b, j, h) of a [B, N, H, D] tensor.
__device__ __forceinline__ size_t head_row(int b, int j, int h, int N, int H, int D) {
    return (((size_t)b * N + j) * H + h) * D;
}

// Copies rows [r0, r0 + TILE) of head h of a [B, N, H, D] tensor (zero past N) into smem with row
// stride ld (bf16), all threads of the block striding over the tile.
template <int TILE>
__device__ __forceinline__ void load_head_tile(bf16* dst, int ld, const bf16* __restrict__ src, int b, int r0, int h,
                                               int N, int H, int D) {
    for (int idx = threadIdx.x; idx < TILE * D; idx += blockDim.x) {
        int r = idx / D, d = idx - r * D;
        int j = r0 + r;
        dst[r * ld + d] = j < N ? src[head_row(b, j, h, N, H, D) + d] : __float2bfloat16(0.f);
    }
}

// Σ_d x[d] · row[d] for an fp32 vector x and a bf16 row (D even, row 4-byte aligned), in order of d.
__device__ __forceinline__ float dot_f32_bf16(const float* x, const bf16* row, int D) {
    float acc = 0.f;
    for (int d = 0; d < D; d += 2) {
        float2 r = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row + d));
        acc = fmaf(x[d], r.x, acc);
        acc = fmaf(x[d + 1], r.y, acc);
    }
    return acc;
}

// RoPE on one interleaved pair (llm_attn.cu, llm_decode.cu): (a, b) ← (a·c − b·s, a·s + b·c),
// rounded to bf16 once per element.
__device__ __forceinline__ void rotate_pair(bf16* e, float c, float s) {
    const float a = __bfloat162float(e[0]), b = __bfloat162float(e[1]);
    e[0] = __float2bfloat16(a * c - b * s);
    e[1] = __float2bfloat16(a * s + b * c);
}

// ---------------------------------------------------------------------------------------------
// The tensor-core tile (mincos_topk.cu v2, edpo_loss.cu): 128 threads = 4 warps as 2×2 over a
// 64×64 tile of A·Bᵀ, each warp 32×32 = 2 (m16) × 4 (n8) mma.sync.m16n8k16 bf16 → fp32. Operands
// stream through shared memory with cp.async (16 B, zero-fill past the edges), double buffered
// over k in steps of 32. Rows are padded to 40 bf16 (80 B) so that the 32-bit fragment loads are
// bank-conflict free. Needs C % 8 == 0 and 16-byte aligned A and B rows.
#define TC_BM 64
#define TC_BN 64
#define TC_BK 32
#define TC_LD (TC_BK + 8)

// 16 bytes global → shared, asynchronous; `valid` false reads nothing and writes 16 zero bytes.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int n = valid ? 16 : 0;  // src-size 0: nothing is read, 16 zero bytes are written
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// D = A·B + D for one m16n8k16 tile; fragment layouts as in the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type"): g = lane/4, t = lane%4,
// a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// b0 = B[2t..2t+1][g], b1 = B[2t+8..][g]  (B column-major = our row-major B rows);
// c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1].
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two adjacent bf16 of shared memory as one 32-bit fragment register.
__device__ __forceinline__ unsigned lds32(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }

// Loads a 64×32 bf16 tile of rows [r0, r0+64) ∩ [0, rows), k [k0, k0+32) ∩ [0, C) into `dst`
// (64 × TC_LD): 256 chunks of 16 B, two per thread (tid < 128).
__device__ __forceinline__ void tc_load_tile(bf16* dst, const bf16* src, int r0, int rows, int k0, int C, int tid) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        int c = tid + e * 128;
        int row = c >> 2, col = (c & 3) * 8;
        int gr = r0 + row, gk = k0 + col;
        bool valid = gr < rows && gk < C;
        const bf16* g = valid ? src + (size_t)gr * C + gk : src;
        cp_async16(dst + row * TC_LD + col, g, valid);
    }
}

// acc = A[m0.., :] · B[n0.., :]ᵀ for a 64×64 tile (A rows < a_rows, B rows < b_rows, zero past),
// through the double-buffered shared tiles As, Bs. The warp (wm, wn) = (warp / 2, warp % 2) holds
// rows wm·32 + mi·16 + g (+8), columns wn·32 + ni·8 + 2t (+1) in acc[mi][ni][0..4] (the mma C
// fragment). Ends with a __syncthreads, so the caller may reload As/Bs at once.
__device__ __forceinline__ void tc_tile_gemm(float (&acc)[2][4][4], const bf16* A, int m0, int a_rows, const bf16* Bm,
                                             int n0, int b_rows, int C, bf16 (*As)[TC_BM * TC_LD],
                                             bf16 (*Bs)[TC_BN * TC_LD]) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
    const int KT = (C + TC_BK - 1) / TC_BK;
    tc_load_tile(As[0], A, m0, a_rows, 0, C, tid);
    tc_load_tile(Bs[0], Bm, n0, b_rows, 0, C, tid);
    cp_async_commit();
    for (int kt = 0; kt < KT; ++kt) {
        const int cur = kt & 1;
        if (kt + 1 < KT) {
            tc_load_tile(As[cur ^ 1], A, m0, a_rows, (kt + 1) * TC_BK, C, tid);
            tc_load_tile(Bs[cur ^ 1], Bm, n0, b_rows, (kt + 1) * TC_BK, C, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* as = As[cur];
        const bf16* bs = Bs[cur];
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            unsigned af[2][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const bf16* p = as + (wm * 32 + mi * 16 + g) * TC_LD + kk + 2 * t;
                af[mi][0] = lds32(p);
                af[mi][1] = lds32(p + 8 * TC_LD);
                af[mi][2] = lds32(p + 8);
                af[mi][3] = lds32(p + 8 * TC_LD + 8);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const bf16* p = bs + (wn * 32 + ni * 8 + g) * TC_LD + kk + 2 * t;
                bfr[ni][0] = lds32(p);
                bfr[ni][1] = lds32(p + 8);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_16816(acc[mi][ni], af[mi], bfr[ni]);
        }
        __syncthreads();  // the next prefetch (or the caller's next tile) overwrites this buffer
    }
}

#endif  // SAGE_KERNELS_COMMON_CUH
