// The emulated device's cuBLASLt (libcublasLt.so): the calls cudarc's `CudaBlasLT::matmul` makes,
// computing D = epilogue(alpha·op(A)·op(B) + beta·C) on the CPU in column-major order, with fp32
// accumulation and bf16 or fp32 storage, strided batches, and the BIAS / GELU_BIAS / GELU / RELU
// epilogues (bias broadcast along D's columns, one value per row of D). It reads the layouts and
// attributes exactly as the host set them, so a wrong leading dimension, stride or transpose in
// src/backend/cuda/gemm.rs gives a wrong product here too (see fake_cuda.cpp for what the emulated
// device is and is not).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include <algorithm>

typedef int Status;
enum : Status { SUCCESS = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum : int { R_32F = 0, R_16BF = 14 };

namespace {

struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int batch = 1;
    int64_t stride = 0;
};
struct Desc {
    int trans_a = 0, trans_b = 0, trans_c = 0;
    int epilogue = 1;  // CUBLASLT_EPILOGUE_DEFAULT
    const void* bias = nullptr;
    int64_t bias_stride = 0;
};

float load(const void* p, int type, int64_t i) {
    if (type == R_32F) return ((const float*)p)[i];
    uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void store(void* p, int type, int64_t i, float v) {
    if (type == R_32F) {
        ((float*)p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t h = std::isnan(v) ? 0x7fc0 : (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    ((uint16_t*)p)[i] = h;
}

bool read_scalar(const void* buf, size_t size, int64_t* out) {
    if (size == 4) {
        int32_t v;
        memcpy(&v, buf, 4);
        *out = v;
    } else if (size == 8) {
        memcpy(out, buf, 8);
    } else {
        return false;
    }
    return true;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default"))) Status

API cublasLtCreate(void** h) {
    *h = new int(0);
    return SUCCESS;
}
API cublasLtDestroy(void* h) {
    delete (int*)h;
    return SUCCESS;
}
API cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (type != R_32F && type != R_16BF) return NOT_SUPPORTED;
    *l = new Layout{type, rows, cols, ld};
    return SUCCESS;
}
API cublasLtMatrixLayoutDestroy(void* l) {
    delete (Layout*)l;
    return SUCCESS;
}
API cublasLtMatrixLayoutSetAttribute(void* l, int attr, const void* buf, size_t size) {
    auto* L = (Layout*)l;
    int64_t v;
    if (!read_scalar(buf, size, &v)) return INVALID_VALUE;
    if (attr == 5)  // BATCH_COUNT
        L->batch = (int)v;
    else if (attr == 6)  // STRIDED_BATCH_OFFSET
        L->stride = v;
    else
        return NOT_SUPPORTED;
    return SUCCESS;
}
API cublasLtMatmulDescCreate(void** d, int compute, int scale) {
    if (scale != R_32F) return NOT_SUPPORTED;
    (void)compute;
    *d = new Desc;
    return SUCCESS;
}
API cublasLtMatmulDescDestroy(void* d) {
    delete (Desc*)d;
    return SUCCESS;
}
API cublasLtMatmulDescSetAttribute(void* d, int attr, const void* buf, size_t size) {
    auto* D = (Desc*)d;
    int64_t v;
    switch (attr) {
        case 3: case 4: case 5: case 7: case 10:
            if (!read_scalar(buf, size, &v)) return INVALID_VALUE;
            if (attr == 3) D->trans_a = (int)v;
            if (attr == 4) D->trans_b = (int)v;
            if (attr == 5) D->trans_c = (int)v;
            if (attr == 7) D->epilogue = (int)v;
            if (attr == 10) D->bias_stride = v;
            return SUCCESS;
        case 8:  // BIAS_POINTER
            if (size != sizeof(void*)) return INVALID_VALUE;
            memcpy(&D->bias, buf, sizeof(void*));
            return SUCCESS;
        default:
            return NOT_SUPPORTED;
    }
}
API cublasLtMatmulPreferenceCreate(void** p) {
    *p = new int(0);
    return SUCCESS;
}
API cublasLtMatmulPreferenceDestroy(void* p) {
    delete (int*)p;
    return SUCCESS;
}
API cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return SUCCESS; }

// cublasLtMatmulHeuristicResult_t: algo (8 × u64), workspaceSize, state, wavesCount, reserved[4].
struct Heuristic {
    uint64_t algo[8];
    size_t workspace;
    Status state;
    float waves;
    int reserved[4];
};
API cublasLtMatmulAlgoGetHeuristic(void*, void*, void*, void*, void*, void*, void*, int requested, Heuristic* out,
                                   int* count) {
    if (requested < 1) return INVALID_VALUE;
    memset(out, 0, sizeof *out);
    out->waves = 1.0f;
    *count = 1;
    return SUCCESS;
}

API cublasLtMatmul(void*, void* desc, const float* alpha, const void* A, void* la, const void* B, void* lb,
                   const float* beta, const void* C, void* lc, void* Dp, void* ld, const void*, void*, size_t, void*) {
    auto* d = (Desc*)desc;
    auto *a = (Layout*)la, *b = (Layout*)lb, *c = (Layout*)lc, *o = (Layout*)ld;
    if (d->trans_c) return NOT_SUPPORTED;
    const uint64_t m = o->rows, n = o->cols;
    const uint64_t k = d->trans_a ? a->rows : a->cols;
    const uint64_t a_m = d->trans_a ? a->cols : a->rows;
    const uint64_t b_k = d->trans_b ? b->cols : b->rows, b_n = d->trans_b ? b->rows : b->cols;
    if (a_m != m || b_k != k || b_n != n || c->rows != m || c->cols != n) {
        fprintf(stderr,
                "emulated cuBLASLt: inconsistent shapes: op(A) %llux%llu, op(B) %llux%llu, C %llux%llu, D %llux%llu\n",
                (unsigned long long)a_m, (unsigned long long)k, (unsigned long long)b_k, (unsigned long long)b_n,
                (unsigned long long)c->rows, (unsigned long long)c->cols, (unsigned long long)m,
                (unsigned long long)n);
        return INVALID_VALUE;
    }
    if ((int64_t)a->rows > a->ld || (int64_t)b->rows > b->ld || (int64_t)c->rows > c->ld || (int64_t)o->rows > o->ld)
        return INVALID_VALUE;  // a column-major leading dimension is at least the row count
    const int batch = o->batch;
    if (a->batch != batch || b->batch != batch || c->batch != batch) return INVALID_VALUE;
    const bool bias = d->epilogue == 4 || d->epilogue == 6 || d->epilogue == 36;
    const bool relu = d->epilogue == 2 || d->epilogue == 6;
    const bool gelu = d->epilogue == 32 || d->epilogue == 36;
    if (!bias && !relu && !gelu && d->epilogue != 1) return NOT_SUPPORTED;
    if (bias && !d->bias) return INVALID_VALUE;
    // op(A) as row-major [m, k] and op(B) as row-major [k, n] in fp32, then row-by-row axpys
    // (a loop the compiler vectorises without reassociating the sums).
    std::vector<float> af(m * k), bf(k * n), row(n);
    for (int bt = 0; bt < batch; ++bt) {
        for (uint64_t i = 0; i < m; ++i)
            for (uint64_t p = 0; p < k; ++p)
                af[i * k + p] = load(A, a->type, bt * a->stride + (int64_t)(d->trans_a ? p + i * a->ld : i + p * a->ld));
        for (uint64_t p = 0; p < k; ++p)
            for (uint64_t j = 0; j < n; ++j)
                bf[p * n + j] = load(B, b->type, bt * b->stride + (int64_t)(d->trans_b ? j + p * b->ld : p + j * b->ld));
        for (uint64_t i = 0; i < m; ++i) {
            std::fill(row.begin(), row.end(), 0.f);
            for (uint64_t p = 0; p < k; ++p) {
                const float x = af[i * k + p];
                const float* br = &bf[p * n];
                for (uint64_t j = 0; j < n; ++j) row[j] += x * br[j];
            }
            for (uint64_t j = 0; j < n; ++j) {
                float v = *alpha * row[j];
                // beta = 0 never reads C (it may be uninitialised), as in cuBLASLt.
                if (*beta != 0.f) v += *beta * load(C, c->type, bt * c->stride + (int64_t)(i + j * c->ld));
                if (bias) v += load(d->bias, o->type, bt * d->bias_stride + (int64_t)i);
                if (relu) v = v > 0.f ? v : 0.f;
                if (gelu) v = 0.5f * v * (1.f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));
                store(Dp, o->type, bt * o->stride + (int64_t)(i + j * o->ld), v);
            }
        }
    }
    return SUCCESS;
}
