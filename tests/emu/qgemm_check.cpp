// Emulated check of kernels/qgemm.cu (run by tests/kernels_emulated.rs; see emu.h for what the
// emulation does and does not catch). The products, the lookup and the slab dequantization are
// held against double-precision references built from the kernel's own per-value decode (`qat`):
// this checks the tiling, the partial tiles, the bias and the accumulation. Whether `qat` reads
// each block layout as ggml does is held against the Rust dequantizer (`quant::dequantize`) by
// tests/kernels_parity.rs on the emulated device; the f16 decode is checked here on all 65 536
// bit patterns.
#include "qgemm.emu.h"

static const int LEN[8] = {32, 32, 32, 32, 32, 256, 256, 256};
static const int BYTES[8] = {18, 20, 22, 24, 34, 144, 176, 210};
static const char* NAME[8] = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"};

// f16 bits of a positive value (truncated mantissa, zero below the normal range: only the
// scales' size matters here).
static uint16_t f16_bits(float v) {
    int e;
    float m = std::frexp(v, &e);  // v = m · 2^e, m in [0.5, 1)
    if (e - 1 + 15 <= 0) return 0;
    return (uint16_t)(((e - 1 + 15) << 10) | ((unsigned)((m * 2 - 1) * 1024) & 0x3ff));
}

// rows × cols random blocks with moderate scales (as quant::blocks::testing::random_matrix does).
static std::vector<unsigned char> random_blocks(int qt, int rows, int cols) {
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    const size_t n = (size_t)rows * cols / LEN[qt];
    std::vector<unsigned char> w(n * BYTES[qt]);
    for (size_t b = 0; b < n; ++b) {
        unsigned char* p = &w[b * BYTES[qt]];
        for (int i = 0; i < BYTES[qt]; ++i) p[i] = (unsigned char)byte(emu_rng);
        auto put = [&](int at, float v) {
            uint16_t h = f16_bits(v);
            if (u(emu_rng) < 0.5f) h |= 0x8000;  // either sign
            p[at] = h & 0xff;
            p[at + 1] = h >> 8;
        };
        float d = 0.01f + 0.02f * u(emu_rng);
        if (qt == 7) {
            put(208, d * 0.1f);
        } else if (qt >= 5) {
            put(0, d * 0.1f);
            put(2, d * 0.01f);
        } else {
            put(0, d);
            if (qt == 1 || qt == 3) put(2, 0.05f * u(emu_rng));
        }
    }
    return w;
}

static float value(int qt, const unsigned char* w, int in, int o, int c) {
    switch (qt) {
        case 0: return qat<0>(w, in, o, c);
        case 1: return qat<1>(w, in, o, c);
        case 2: return qat<2>(w, in, o, c);
        case 3: return qat<3>(w, in, o, c);
        case 4: return qat<4>(w, in, o, c);
        case 5: return qat<5>(w, in, o, c);
        case 6: return qat<6>(w, in, o, c);
        default: return qat<7>(w, in, o, c);
    }
}

static bool near(double got, double want, double scale) { return std::fabs(got - want) <= 1e-2 * scale + 1e-6; }

// Every f16 bit pattern against its definition in double.
void f16_case() {
    const int fail0 = g_fail;
    for (unsigned h = 0; h < 65536; ++h) {
        unsigned char p[2] = {(unsigned char)(h & 0xff), (unsigned char)(h >> 8)};
        const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
        const float got = f16_at(p);
        if (e == 31) {
            CHECK(m ? std::isnan(got) : (std::isinf(got) && (got < 0) == (s == 1)), "f16 %04x: %g", h, got);
            continue;
        }
        double want = e == 0 ? m * std::ldexp(1.0, -24) : (1.0 + m / 1024.0) * std::ldexp(1.0, e - 15);
        if (s) want = -want;
        CHECK((double)got == want && std::signbit(got) == (s == 1), "f16 %04x: %g vs %g", h, got, want);
    }
    printf("case f16 decode, all 65536 patterns: %s\n", g_fail > fail0 ? "FAIL" : "ok");
}

// y = x·Wᵀ (+ bias) (+ y) at odd out (partial 4-warp groups) and rows (partial 8-row tiles).
void xwt_case(int qt, int out, int in, int rows, bool bias, bool acc) {
    const int fail0 = g_fail;
    auto w = random_blocks(qt, out, in);
    auto x = rand_bf16((size_t)rows * in);
    auto b = rand_bf16(out);
    auto y = rand_bf16((size_t)rows * out);
    const auto y0 = y;
    launch({(unsigned)((out + 3) / 4), (unsigned)((rows + QG_ROWS - 1) / QG_ROWS)}, 128, qgemm_xwt, w.data(), qt, out, in,
           x.data(), rows, b.data(), (int)bias, (int)acc, y.data());
    std::vector<double> want((size_t)rows * out);
    double scale = 0;
    for (int r = 0; r < rows; ++r)
        for (int o = 0; o < out; ++o) {
            double s = 0;
            for (int c = 0; c < in; ++c) s += f64(x[(size_t)r * in + c]) * value(qt, w.data(), in, o, c);
            if (bias) s += f64(b[o]);
            if (acc) s += f64(y0[(size_t)r * out + o]);
            want[(size_t)r * out + o] = s;
            scale = std::max(scale, std::fabs(s));
        }
    for (size_t i = 0; i < want.size(); ++i)
        CHECK(near(f64(y[i]), want[i], scale), "%s xwt at %zu: %f vs %f", NAME[qt], i, f64(y[i]), want[i]);
    printf("case qgemm_xwt %s out%d in%d rows%d bias%d acc%d: %s\n", NAME[qt], out, in, rows, bias, acc,
           g_fail > fail0 ? "FAIL" : "ok");
}

// dx = dy·W (+ dx) at in not a multiple of 256 (partial column blocks) and partial row tiles.
void dyw_case(int qt, int out, int in, int rows, bool acc) {
    const int fail0 = g_fail;
    auto w = random_blocks(qt, out, in);
    auto dy = rand_bf16((size_t)rows * out);
    auto dx = rand_bf16((size_t)rows * in);
    const auto dx0 = dx;
    launch({(unsigned)((in + 255) / 256), (unsigned)((rows + QG_ROWS - 1) / QG_ROWS)}, 256, qgemm_dyw, w.data(), qt, out,
           in, dy.data(), rows, (int)acc, dx.data());
    std::vector<double> want((size_t)rows * in);
    double scale = 0;
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < in; ++c) {
            double s = acc ? f64(dx0[(size_t)r * in + c]) : 0.0;
            for (int o = 0; o < out; ++o) s += f64(dy[(size_t)r * out + o]) * value(qt, w.data(), in, o, c);
            want[(size_t)r * in + c] = s;
            scale = std::max(scale, std::fabs(s));
        }
    for (size_t i = 0; i < want.size(); ++i)
        CHECK(near(f64(dx[i]), want[i], scale), "%s dyw at %zu: %f vs %f", NAME[qt], i, f64(dx[i]), want[i]);
    printf("case qgemm_dyw %s out%d in%d rows%d acc%d: %s\n", NAME[qt], out, in, rows, acc, g_fail > fail0 ? "FAIL" : "ok");
}

// The lookup (repeated ids) and the whole matrix: each value the bf16 rounding of its decode.
void rows_case(int qt, int vocab, int in) {
    const int fail0 = g_fail;
    auto w = random_blocks(qt, vocab, in);
    std::uniform_int_distribution<int> pick(0, vocab - 1);
    std::vector<int> ids = {vocab - 1, 0, pick(emu_rng), pick(emu_rng), 0};
    std::vector<bf16> out(ids.size() * in);
    launch({(unsigned)ids.size()}, 128, qembed, w.data(), qt, in, ids.data(), out.data());
    for (size_t i = 0; i < ids.size(); ++i)
        for (int c = 0; c < in; ++c) {
            uint16_t want = __float2bfloat16(value(qt, w.data(), in, ids[i], c)).x;
            CHECK(out[i * in + c].x == want, "%s qembed row %zu col %d", NAME[qt], i, c);
        }
    std::vector<bf16> all((size_t)vocab * in);
    launch({(unsigned)vocab}, 128, qdequant_rows, w.data(), qt, in, all.data());
    for (int i = 0; i < vocab; ++i)
        for (int c = 0; c < in; ++c) {
            uint16_t want = __float2bfloat16(value(qt, w.data(), in, i, c)).x;
            CHECK(all[(size_t)i * in + c].x == want, "%s qdequant_rows row %d col %d", NAME[qt], i, c);
        }
    printf("case qembed + qdequant_rows %s vocab%d in%d: %s\n", NAME[qt], vocab, in, g_fail > fail0 ? "FAIL" : "ok");
}

int main() {
    f16_case();
    for (int qt = 0; qt < 8; ++qt) {
        const int L = LEN[qt];
        xwt_case(qt, 1, L, 1, false, false);
        xwt_case(qt, 7, 3 * L, 17, true, false);
        xwt_case(qt, 10, (L == 32 ? 11 : 2) * L, 9, false, true);
        dyw_case(qt, 1, L, 1, false);
        dyw_case(qt, 13, (L == 32 ? 11 : 2) * L, 10, false);
        dyw_case(qt, 6, 3 * L, 8, true);
        rows_case(qt, 9, 2 * L);
    }
    return g_fail ? 1 : 0;
}
