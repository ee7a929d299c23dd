// A small CPU emulation of the CUDA features kernels/*.cu use, so that their indexing, tiling,
// reductions and synchronisation can be checked against references on a machine with no GPU
// (tests/kernels_emulated.rs). It is a logic check, not a substitute for parity on a device:
//   - every CUDA thread of a block is a fiber on one host thread (a 6-register context switch),
//     run round-robin; blocks run one after another; __syncthreads and warp shuffles are barriers
//     (so a missing __syncthreads between block-wide phases may go unseen when the phases happen
//     to be ordered anyway);
//   - cp.async is a synchronous copy (a missing cp.async.wait is not caught);
//   - mma.sync m16n8k16 is rebuilt from the fragment layout of the PTX ISA, the same reading the
//     kernels use (a shared misreading would cancel out);
//   - expf/logf are the host's, bf16 rounding is round-to-nearest-even as on the GPU.
// The test rewrites each kernel before compiling it with the host C++ compiler
// (tests/common/emu.rs): kernels/common.cuh is pasted where it is included, `#include
// <cuda_bf16.h>` becomes this header, `extern __shared__` arrays point into g_dyn_smem, and
// common.cuh's inline-PTX helpers (cp_async16, cp_async_commit, cp_async_wait, mma_16816) are
// replaced by the definitions below.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <functional>
#include <sys/mman.h>
#include <vector>

struct dim3e {
    unsigned x = 1, y = 1, z = 1;
};
// Set by the fiber scheduler before it resumes a CUDA thread.
inline dim3e threadIdx, blockIdx;
inline dim3e blockDim, gridDim;

// ---- cooperative CUDA threads ----
// Each CUDA thread of a block runs as a fiber on the launching host thread; a fiber gives the host
// thread back only at a barrier, so the block's threads interleave exactly at __syncthreads and
// warp-synchronous points, deterministically, and a launch costs no OS thread.
extern "C" void emu_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers and the stack pointer into *save_sp, loads load_sp, restores
// the registers saved there and returns into that context (x86-64 System V).
asm(R"(
    .text
    .weak emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#if !defined(__x86_64__)
#error "tests/emu/emu.h switches fibers with x86-64 assembly"
#endif

struct emu_fiber {
    void* sp = nullptr;
    bool done = false;
};
inline std::vector<emu_fiber> g_fibers;
inline std::vector<char*> g_stacks;  // one per fiber, reused across blocks and launches
constexpr size_t EMU_STACK = 256 << 10, EMU_GUARD = 4096;
inline void* g_sched_sp;
inline unsigned g_cur;
inline std::function<void()> g_body;

inline void emu_yield() { emu_switch(&g_fibers[g_cur].sp, g_sched_sp); }

// A barrier among fibers with std::barrier's arrive_and_wait / arrive_and_drop.
struct emu_barrier {
    unsigned expected, count = 0, gen = 0;
    explicit emu_barrier(unsigned n) : expected(n) {}
    void arrive_and_wait() {
        unsigned g = gen;
        if (++count == expected) {
            count = 0;
            ++gen;
        } else {
            while (gen == g) emu_yield();
        }
    }
    void arrive_and_drop() {
        --expected;
        if (count > 0 && count == expected) {
            count = 0;
            ++gen;
        }
    }
};
inline emu_barrier* g_block_bar;
inline std::vector<emu_barrier> g_warp_bar;
inline uint64_t g_shfl[32][32];
inline std::atomic<int> g_or{0};
// 227 KiB: the most dynamic shared memory a block can opt into on sm_90.
alignas(16) inline unsigned char g_dyn_smem[232448];

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Blocks run one at a time, so a function-local static is exactly one block's shared memory.
#define __shared__ static

struct __nv_bfloat16 {
    uint16_t x;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct float2 {
    float x, y;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (std::isnan(f)) return {0x7fc0};
    uint32_t r = u + 0x7fff + ((u >> 16) & 1);
    return {(uint16_t)(r >> 16)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
using std::isfinite;

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline int __syncthreads_or(int p) {
    g_block_bar->arrive_and_wait();
    if (p) g_or.store(1);
    g_block_bar->arrive_and_wait();
    int r = g_or.load();
    g_block_bar->arrive_and_wait();
    if (threadIdx.x == 0) g_or.store(0);
    return r;
}
inline void emu_warp_sync() { g_warp_bar[threadIdx.x / 32].arrive_and_wait(); }
template <class T>
T emu_shfl(T v, int src) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    memcpy(&g_shfl[w][l], &v, sizeof(T));
    emu_warp_sync();
    T r;
    memcpy(&r, &g_shfl[w][src & 31], sizeof(T));
    emu_warp_sync();
    return r;
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int o) {
    return emu_shfl(v, (threadIdx.x % 32) ^ o);
}
template <class T>
T __shfl_sync(unsigned, T v, int s) {
    return emu_shfl(v, s);
}

inline void cp_async16(void* smem, const void* gmem, bool valid) {
    if (valid)
        memcpy(smem, gmem, 16);
    else
        memset(smem, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

inline uint32_t g_mma_a[32][32][4], g_mma_b[32][32][2];
inline float emu_bf_lo(uint32_t u) { return __bfloat162float({(uint16_t)(u & 0xffff)}); }
inline float emu_bf_hi(uint32_t u) { return __bfloat162float({(uint16_t)(u >> 16)}); }
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += a·b, from each lane's fragments.
inline void mma_16816(float* c, const unsigned* a, const unsigned* b) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    for (int i = 0; i < 4; ++i) g_mma_a[w][l][i] = a[i];
    for (int i = 0; i < 2; ++i) g_mma_b[w][l][i] = b[i];
    emu_warp_sync();
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
        int g = L >> 2, t = L & 3;
        const uint32_t* aa = g_mma_a[w][L];
        A[g][2 * t] = emu_bf_lo(aa[0]);
        A[g][2 * t + 1] = emu_bf_hi(aa[0]);
        A[g + 8][2 * t] = emu_bf_lo(aa[1]);
        A[g + 8][2 * t + 1] = emu_bf_hi(aa[1]);
        A[g][2 * t + 8] = emu_bf_lo(aa[2]);
        A[g][2 * t + 9] = emu_bf_hi(aa[2]);
        A[g + 8][2 * t + 8] = emu_bf_lo(aa[3]);
        A[g + 8][2 * t + 9] = emu_bf_hi(aa[3]);
        const uint32_t* bb = g_mma_b[w][L];
        B[2 * t][g] = emu_bf_lo(bb[0]);
        B[2 * t + 1][g] = emu_bf_hi(bb[0]);
        B[2 * t + 8][g] = emu_bf_lo(bb[1]);
        B[2 * t + 9][g] = emu_bf_hi(bb[1]);
    }
    int g = l >> 2, t = l & 3;
    for (int k = 0; k < 16; ++k) {
        c[0] += A[g][k] * B[k][2 * t];
        c[1] += A[g][k] * B[k][2 * t + 1];
        c[2] += A[g + 8][k] * B[k][2 * t];
        c[3] += A[g + 8][k] * B[k][2 * t + 1];
    }
    emu_warp_sync();
}

[[noreturn]] inline void emu_fiber_entry() {
    g_body();
    g_warp_bar[threadIdx.x / 32].arrive_and_drop();
    g_block_bar->arrive_and_drop();
    g_fibers[g_cur].done = true;
    emu_yield();
    __builtin_unreachable();
}

// kernel<<<grid, block>>>(args...) with a 1-D block; blocks run one after another.
template <class F, class... Args>
void launch(dim3e grid, unsigned threads, F f, Args... args) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    g_body = [&] { f(args...); };
    while (g_stacks.size() < threads) {
        // A guard page below each stack: an overflow faults instead of corrupting a neighbour.
        void* m = mmap(nullptr, EMU_STACK + EMU_GUARD, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) abort();
        mprotect(m, EMU_GUARD, PROT_NONE);
        g_stacks.push_back((char*)m + EMU_GUARD);
    }
    g_fibers.assign(threads, {});
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                emu_barrier bar(threads);
                g_block_bar = &bar;
                g_warp_bar.clear();
                for (unsigned w = 0; w < (threads + 31) / 32; ++w) g_warp_bar.emplace_back(std::min(32u, threads - 32 * w));
                blockIdx = {bx, by, bz};
                for (unsigned t = 0; t < threads; ++t) {
                    // The first switch into a fiber pops six zero registers and returns into
                    // emu_fiber_entry with the stack aligned as after a call.
                    void** sp = (void**)(g_stacks[t] + EMU_STACK);
                    *--sp = nullptr;
                    *--sp = (void*)&emu_fiber_entry;
                    for (int r = 0; r < 6; ++r) *--sp = nullptr;
                    g_fibers[t] = {sp, false};
                }
                for (unsigned live = threads; live > 0;)
                    for (unsigned t = 0; t < threads; ++t) {
                        if (g_fibers[t].done) continue;
                        g_cur = t;
                        threadIdx = {t, 0, 0};
                        emu_switch(&g_sched_sp, g_fibers[t].sp);
                        live -= g_fibers[t].done;
                    }
            }
}

// ---- checking helpers for the harnesses ----
#include <cstdio>
#include <random>
typedef __nv_bfloat16 bf16;
inline std::mt19937 emu_rng(42);
inline std::vector<bf16> rand_bf16(size_t n, float lo = -1, float hi = 1) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<bf16> v(n);
    for (auto& x : v) x = __float2bfloat16(d(emu_rng));
    return v;
}
inline double f64(bf16 b) { return __bfloat162float(b); }
// RoPE tables cos, sin [max_pos, D/2] (θ = 10000), as ops::rope builds them.
inline void rope_tables(int max_pos, int D, std::vector<float>& cs, std::vector<float>& sn) {
    const int half = D / 2;
    cs.assign((size_t)max_pos * half, 0.f);
    sn.assign((size_t)max_pos * half, 0.f);
    for (int p = 0; p < max_pos; ++p)
        for (int i = 0; i < half; ++i) {
            double a = p * std::pow(10000.0, -2.0 * i / D);
            cs[(size_t)p * half + i] = (float)std::cos(a);
            sn[(size_t)p * half + i] = (float)std::sin(a);
        }
}
inline int g_fail = 0;
#define CHECK(cond, ...)                                       \
    do {                                                       \
        if (!(cond)) {                                         \
            if (g_fail++ < 20) {                               \
                printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
                printf(__VA_ARGS__);                           \
                printf("\n");                                  \
            }                                                  \
        }                                                      \
    } while (0)
