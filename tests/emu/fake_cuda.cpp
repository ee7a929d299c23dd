// An emulated CUDA device for machines without one: the subset of the driver API (libcuda.so)
// that cudarc and src/backend/cuda call, executing every launch on the CPU through emu.h, so the
// host side of the CUDA backend (argument lists, grid and block sizes, dynamic shared memory,
// copies, buffer sizes) runs end to end against the CPU references (tests/kernels_parity.rs,
// `kernel_parity_on_the_emulated_device`).
//
// What it checks that a kernel-only emulation cannot:
//   - the launch matches the kernel the PTX defines: the entry point exists in the module the host
//     loaded, the block fits the kernel's `.maxntid` (its __launch_bounds__), dynamic shared memory
//     above 48 KiB was opted into with cuFuncSetAttribute, as on a real device;
//   - copies and memsets stay inside an allocation;
//   - every allocation ends at a guard page, so a kernel that reads or writes past the end of a
//     buffer stops the process with the kernel's name (a coarse memcheck: accesses before the start
//     or inside alignment padding go unseen).
// What it is not: a GPU. Work is synchronous on one stream, timings are CPU times, there is no
// memory pool (cudarc falls back to cuMemAlloc), and everything emu.h cannot see stays unseen.
#include "fake_cuda.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
enum : CUresult {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
};

namespace {

std::recursive_mutex g_mu;
#define LOCK std::lock_guard<std::recursive_mutex> lock_(g_mu)

std::unordered_map<std::string, fake_cuda_launcher>& registry() {
    static std::unordered_map<std::string, fake_cuda_launcher> r;
    return r;
}

// ---- memory: each allocation ends 16-byte aligned right before a PROT_NONE page ----
struct Alloc {
    char* base;          // the mapping
    size_t mapped;       // its length, guard page included
    size_t size;         // what the host asked for
};
std::map<uintptr_t, Alloc> g_allocs;  // by user pointer
size_t g_in_use = 0;
const size_t kTotal = size_t(16) << 30;  // what the device claims to have
const char* volatile g_kernel = nullptr;  // the kernel running now, for the fault message

size_t page() {
    static size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

CUresult alloc(CUdeviceptr* out, size_t n) {
    if (!out || n == 0) return INVALID_VALUE;
    if (g_in_use + n > kTotal) return OUT_OF_MEMORY;
    size_t body = (n + 15) / 16 * 16;
    size_t data_pages = (body + page() - 1) / page() * page();
    size_t mapped = data_pages + page();
    void* m = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return OUT_OF_MEMORY;
    char* base = (char*)m;
    mprotect(base + data_pages, page(), PROT_NONE);
    char* user = base + data_pages - body;
    // Fresh device memory is not zero on a GPU: fill it with a NaN pattern so that a kernel
    // reading what nobody wrote shows up in the parity checks.
    memset(user, 0xff, body);
    g_allocs[(uintptr_t)user] = {base, mapped, n};
    g_in_use += n;
    *out = (CUdeviceptr)user;
    return OK;
}

CUresult release(CUdeviceptr p) {
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end()) {
        fprintf(stderr, "emulated CUDA: free of %#llx, which is not an allocation\n", p);
        return INVALID_VALUE;
    }
    munmap(it->second.base, it->second.mapped);
    g_in_use -= it->second.size;
    g_allocs.erase(it);
    return OK;
}

// Whether [p, p + n) lies inside one allocation.
bool inside(CUdeviceptr p, size_t n, const char* what) {
    auto it = g_allocs.upper_bound((uintptr_t)p);
    if (it != g_allocs.begin()) {
        --it;
        if ((uintptr_t)p >= it->first && (uintptr_t)p + n <= it->first + it->second.size) return true;
    }
    fprintf(stderr, "emulated CUDA: %s of %zu bytes at %#llx is outside every allocation\n", what, n, p);
    return false;
}

void on_fault(int, siginfo_t* info, void*) {
    char msg[512];
    uintptr_t a = (uintptr_t)info->si_addr;
    const char* k = g_kernel ? g_kernel : "(no kernel: host code)";
    int len = snprintf(msg, sizeof msg,
                       "emulated CUDA: kernel %s touched %#lx, outside its buffers (an out-of-bounds access)\n", k,
                       (unsigned long)a);
    for (auto& [user, al] : g_allocs) {
        uintptr_t guard = (uintptr_t)al.base + al.mapped - page();
        if (a >= guard && a < guard + page()) {
            len += snprintf(msg + len, sizeof msg - len, "  %zu bytes past the end of the %zu-byte buffer at %#lx\n",
                            (size_t)(a - (user + al.size)), al.size, (unsigned long)user);
            break;
        }
    }
    (void)!write(2, msg, len);
    _exit(86);
}

struct FaultHandler {
    FaultHandler() {
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    }
};

// ---- modules and functions ----
struct Function {
    std::string name;
    fake_cuda_launcher launch;
    unsigned max_threads;       // the PTX's .maxntid, 1024 without one
    int max_dynamic_smem = 48 * 1024;
};
struct Module {
    std::map<std::string, unsigned> entries;  // name → .maxntid
    std::map<std::string, Function*> functions;
};

// `.entry NAME(` … `.maxntid X, Y, Z` in the PTX text, per entry point.
std::map<std::string, unsigned> ptx_entries(const char* ptx) {
    std::map<std::string, unsigned> out;
    std::string s(ptx);
    size_t at = 0;
    while ((at = s.find(".entry ", at)) != std::string::npos) {
        at += 7;
        size_t end = s.find_first_of("( \n", at);
        std::string name = s.substr(at, end - at);
        size_t body = s.find('{', end);
        size_t nt = s.find(".maxntid", end);
        unsigned max_threads = 1024;
        if (nt != std::string::npos && nt < body) max_threads = (unsigned)strtoul(s.c_str() + nt + 8, nullptr, 10);
        out[name] = max_threads;
    }
    return out;
}

struct Event {
    std::chrono::steady_clock::time_point at;
};

void* g_ctx = (void*)0x5a6e;  // the primary context's handle
void* g_current = nullptr;

}  // namespace

extern "C" void fake_cuda_register(const char* name, fake_cuda_launcher launch) { registry()[name] = launch; }

#define API extern "C" __attribute__((visibility("default"))) CUresult

API cuInit(unsigned) {
    static FaultHandler h;
    return OK;
}
API cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
API cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
API cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return INVALID_VALUE;
    *d = 0;
    return OK;
}
API cuDeviceGetName(char* name, int len, int) {
    snprintf(name, len, "sage emulated device (CPU, tests/emu)");
    return OK;
}
API cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = kTotal;
    return OK;
}
API cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; break;      // MAX_THREADS_PER_BLOCK
        case 8: *v = 48 * 1024; break; // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;       // WARP_SIZE
        case 16: *v = 132; break;      // MULTIPROCESSOR_COUNT (an H100 SXM)
        case 75: *v = 9; break;        // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;        // COMPUTE_CAPABILITY_MINOR
        case 97: *v = (int)sizeof(g_dyn_smem); break;  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 0; break;       // MEMORY_POOLS_SUPPORTED: cudarc then uses cuMemAlloc
        default: *v = 0;
    }
    return OK;
}
API cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = g_ctx;
    return OK;
}
API cuDevicePrimaryCtxRelease_v2(int) { return OK; }
API cuCtxGetCurrent(void** ctx) {
    *ctx = g_current;
    return OK;
}
API cuCtxSetCurrent(void* ctx) {
    g_current = ctx;
    return OK;
}
API cuCtxSynchronize() { return OK; }
API cuCtxSynchronize_v2() { return OK; }
API cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return OK;
}
API cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

API cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    LOCK;
    *free_b = kTotal - g_in_use;
    *total = kTotal;
    return OK;
}
API cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    LOCK;
    return alloc(p, n);
}
API cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) {
    LOCK;
    return alloc(p, n);
}
API cuMemFree_v2(CUdeviceptr p) {
    LOCK;
    return release(p);
}
API cuMemFreeAsync(CUdeviceptr p, void*) {
    LOCK;
    return release(p);
}
API cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    LOCK;
    if (!inside(dst, n, "host-to-device copy")) return INVALID_VALUE;
    memcpy((void*)dst, src, n);
    return OK;
}
API cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) { return cuMemcpyHtoD_v2(dst, src, n); }
API cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    LOCK;
    if (!inside(src, n, "device-to-host copy")) return INVALID_VALUE;
    memcpy(dst, (const void*)src, n);
    return OK;
}
API cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoH_v2(dst, src, n); }
API cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    LOCK;
    if (!inside(dst, n, "device-to-device copy (destination)") || !inside(src, n, "device-to-device copy (source)"))
        return INVALID_VALUE;
    memmove((void*)dst, (const void*)src, n);
    return OK;
}
API cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoD_v2(dst, src, n); }
API cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    LOCK;
    if (!inside(dst, n, "memset")) return INVALID_VALUE;
    memset((void*)dst, v, n);
    return OK;
}
API cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(dst, v, n); }

API cuStreamCreate(void** s, unsigned) {
    *s = new int(0);
    return OK;
}
API cuStreamDestroy_v2(void* s) {
    delete (int*)s;
    return OK;
}
API cuStreamSynchronize(void*) { return OK; }
API cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
API cuEventCreate(void** e, unsigned) {
    *e = new Event{std::chrono::steady_clock::now()};
    return OK;
}
API cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return OK;
}
API cuEventRecord(void* e, void*) {
    ((Event*)e)->at = std::chrono::steady_clock::now();
    return OK;
}
API cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
API cuEventSynchronize(void*) { return OK; }
API cuEventQuery(void*) { return OK; }
API cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = std::chrono::duration<float, std::milli>(((Event*)b)->at - ((Event*)a)->at).count();
    return OK;
}
API cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

API cuModuleLoadData(void** mod, const void* image) {
    LOCK;
    auto* m = new Module;
    m->entries = ptx_entries((const char*)image);
    if (m->entries.empty()) {
        fprintf(stderr, "emulated CUDA: the module image has no .entry (is it PTX text?)\n");
        delete m;
        return INVALID_VALUE;
    }
    *mod = m;
    return OK;
}
API cuModuleLoadDataEx(void** mod, const void* image, unsigned, void*, void*) { return cuModuleLoadData(mod, image); }
API cuModuleUnload(void* mod) {
    LOCK;
    auto* m = (Module*)mod;
    for (auto& [_, f] : m->functions) delete f;
    delete m;
    return OK;
}
API cuModuleGetFunction(void** out, void* mod, const char* name) {
    LOCK;
    auto* m = (Module*)mod;
    auto e = m->entries.find(name);
    if (e == m->entries.end()) return NOT_FOUND;
    auto r = registry().find(name);
    if (r == registry().end()) {
        fprintf(stderr, "emulated CUDA: the PTX has entry %s but no emulated kernel registered it\n", name);
        return NOT_FOUND;
    }
    auto& f = m->functions[name];
    if (!f) f = new Function{name, r->second, e->second};
    *out = f;
    return OK;
}
API cuFuncSetAttribute(void* func, int attr, int value) {
    LOCK;
    auto* f = (Function*)func;
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > (int)sizeof(g_dyn_smem)) return INVALID_VALUE;
        f->max_dynamic_smem = value;
    }
    return OK;
}

API cuLaunchKernel(void* func, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, void*, void** params, void** extra) {
    LOCK;
    auto* f = (Function*)func;
    auto fail = [&](const char* why) {
        fprintf(stderr, "emulated CUDA: launch of %s (grid %u×%u×%u, block %u×%u×%u, %u B shared) refused: %s\n",
                f->name.c_str(), gx, gy, gz, bx, by, bz, smem, why);
        return INVALID_VALUE;
    };
    if (extra) return fail("`extra` launch arguments are not emulated");
    if (!params) return fail("no kernel parameters");
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) return fail("grid size out of range");
    if (by != 1 || bz != 1) return fail("the emulation runs 1-D blocks only");
    if (bx == 0 || bx > 1024) return fail("block size out of range");
    if (bx > f->max_threads) return fail("more threads than the kernel's __launch_bounds__ (.maxntid)");
    if ((int)smem > f->max_dynamic_smem)
        return fail("dynamic shared memory above the kernel's limit (cuFuncSetAttribute raises it past 48 KiB)");
    g_kernel = f->name.c_str();
    f->launch(dim3e{gx, gy, gz}, bx, params);
    g_kernel = nullptr;
    return OK;
}
