// Emulated check of kernels/head_ops.cu against double-precision references (run by
// tests/kernels_emulated.rs; see emu.h for what the emulation does and does not catch). The
// chunked partial sums are finished here in sum_rows_f32's order (chunk 0, 1, ...).
#include "head_ops.emu.h"

static std::vector<float> finish(const std::vector<float>& part, int chunks, int C, float init) {
  std::vector<float> out(C, init);
  for (int j = 0; j < C; ++j) {
    float acc = 0.f;
    for (int k = 0; k < chunks; ++k) acc += part[(size_t)k * C + j];
    out[j] += acc;
  }
  return out;
}

void layernorm_case(int rows, int C, int chunk_rows) {
  const int fail0 = g_fail;
  const float eps = 1e-5f;
  auto x = rand_bf16((size_t)rows * C, -2, 3), w = rand_bf16(C, 0.5, 1.5), b = rand_bf16(C), dy = rand_bf16((size_t)rows * C);
  std::vector<bf16> y((size_t)rows * C), dx((size_t)rows * C);
  std::vector<float> stats(2 * rows, -1.f);
  const unsigned g = (unsigned)((rows + 7) / 8);
  launch({g}, 256, layernorm_fwd, x.data(), w.data(), b.data(), rows, C, eps, y.data(), stats.data());
  launch({g}, 256, layernorm_bwd_dx, x.data(), w.data(), dy.data(), stats.data(), rows, C, dx.data());
  const int chunks = (rows + chunk_rows - 1) / chunk_rows;
  std::vector<float> pw((size_t)chunks * C, 777.f), pb((size_t)chunks * C, 777.f);
  launch({(unsigned)((C + 255) / 256), (unsigned)chunks}, 256, layernorm_bwd_dwdb_partial, x.data(), dy.data(),
         stats.data(), rows, C, chunk_rows, pw.data(), pb.data());
  auto dw = finish(pw, chunks, C, 0.25f), db = finish(pb, chunks, C, -0.5f);
  std::vector<double> rdw(C, 0.25), rdb(C, -0.5);
  for (int r = 0; r < rows; ++r) {
    const size_t o = (size_t)r * C;
    double mean = 0, var = 0;
    for (int j = 0; j < C; ++j) mean += f64(x[o + j]);
    mean /= C;
    for (int j = 0; j < C; ++j) var += (f64(x[o + j]) - mean) * (f64(x[o + j]) - mean);
    const double rs = 1 / std::sqrt(var / C + eps);
    CHECK(std::fabs(stats[2 * r] - mean) < 1e-5 && std::fabs(stats[2 * r + 1] - rs) < 1e-4 * rs, "stats[%d]", r);
    double mg = 0, mgx = 0;
    for (int j = 0; j < C; ++j) {
      const double xh = (f64(x[o + j]) - mean) * rs, gh = f64(dy[o + j]) * f64(w[j]);
      const double want = xh * f64(w[j]) + f64(b[j]);
      CHECK(std::fabs(f64(y[o + j]) - want) <= 1e-2 * std::fabs(want) + 1e-2, "y[%d,%d] %f vs %f", r, j, f64(y[o + j]), want);
      mg += gh;
      mgx += gh * xh;
      rdw[j] += f64(dy[o + j]) * xh;
      rdb[j] += f64(dy[o + j]);
    }
    mg /= C;
    mgx /= C;
    for (int j = 0; j < C; ++j) {
      const double xh = (f64(x[o + j]) - mean) * rs, want = rs * (f64(dy[o + j]) * f64(w[j]) - mg - xh * mgx);
      CHECK(std::fabs(f64(dx[o + j]) - want) <= 1e-2 * std::fabs(want) + 2e-2, "dx[%d,%d] %f vs %f", r, j, f64(dx[o + j]), want);
    }
  }
  for (int j = 0; j < C; ++j) {
    CHECK(std::fabs(dw[j] - rdw[j]) <= 1e-4 * (1 + std::fabs(rdw[j])), "dw[%d] %f vs %f", j, dw[j], rdw[j]);
    CHECK(std::fabs(db[j] - rdb[j]) <= 1e-4 * (1 + std::fabs(rdb[j])), "db[%d] %f vs %f", j, db[j], rdb[j]);
  }
  printf("case layernorm rows%d C%d chunk%d: %s\n", rows, C, chunk_rows, g_fail > fail0 ? "FAIL" : "ok");
}

void colsum_case(int rows, int C, int chunk_rows) {
  const int fail0 = g_fail;
  auto x = rand_bf16((size_t)rows * C, -3, 3);
  const int chunks = (rows + chunk_rows - 1) / chunk_rows;
  std::vector<float> part((size_t)chunks * C, 777.f);
  launch({(unsigned)((C + 255) / 256), (unsigned)chunks}, 256, colsum_partial, x.data(), rows, C, chunk_rows, part.data());
  auto out = finish(part, chunks, C, 1.f);
  for (int j = 0; j < C; ++j) {
    double want = 1;
    for (int r = 0; r < rows; ++r) want += f64(x[(size_t)r * C + j]);
    CHECK(std::fabs(out[j] - want) <= 1e-4 * (1 + std::fabs(want)), "colsum[%d] %f vs %f", j, out[j], want);
  }
  printf("case colsum rows%d C%d chunk%d: %s\n", rows, C, chunk_rows, g_fail > fail0 ? "FAIL" : "ok");
}

void gelu_scale_case(long long n, float s) {
  const int fail0 = g_fail;
  auto x = rand_bf16(n, -6, 6), dy = rand_bf16(n);
  std::vector<bf16> y(n), dx(n);
  const unsigned blocks = (unsigned)((n + 255) / 256);
  launch({blocks}, 256, gelu_fwd, x.data(), n, y.data());
  launch({blocks}, 256, gelu_bwd, dy.data(), x.data(), n, dx.data());
  auto z = x;
  launch({blocks}, 256, scale_bf16, z.data(), n, s);
  std::vector<float> xf(n), ff(n);
  for (long long i = 0; i < n; ++i) {
    xf[i] = f64(x[i]);
    ff[i] = f64(dy[i]);
  }
  launch({blocks}, 256, mul_f32, xf.data(), ff.data(), n);
  for (long long i = 0; i < n; ++i) CHECK(xf[i] == (float)(f64(x[i]) * f64(dy[i])), "mul_f32[%lld]", i);
  for (long long i = 0; i < n; ++i) {
    const double v = f64(x[i]), cdf = 0.5 * (1 + std::erf(v / std::sqrt(2.0)));
    const double pdf = std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI);
    const double wy = v * cdf, wd = f64(dy[i]) * (cdf + v * pdf), wz = s * v;
    CHECK(std::fabs(f64(y[i]) - wy) <= 1e-2 * std::fabs(wy) + 1e-6, "gelu[%lld] %f vs %f", i, f64(y[i]), wy);
    CHECK(std::fabs(f64(dx[i]) - wd) <= 1e-2 * std::fabs(wd) + 1e-4, "gelu'[%lld] %f vs %f", i, f64(dx[i]), wd);
    CHECK(std::fabs(f64(z[i]) - wz) <= 4e-3 * std::fabs(wz), "scale[%lld] %f vs %f", i, f64(z[i]), wz);
  }
  printf("case gelu_scale n%lld s%g: %s\n", n, s, g_fail > fail0 ? "FAIL" : "ok");
}

int main() {
  layernorm_case(1, 1, 1);
  layernorm_case(5, 37, 2);
  layernorm_case(17, 576, 64);
  layernorm_case(9, 300, 4);
  colsum_case(1, 1, 1);
  colsum_case(70, 300, 64);
  colsum_case(3, 1025, 2);
  gelu_scale_case(1, 2.f);
  gelu_scale_case(1000, 0.5f);
  return g_fail ? 1 : 0;
}
