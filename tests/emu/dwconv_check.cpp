// Emulated check of kernels/dwconv.cu against double-precision references (run by
// tests/kernels_emulated.rs; see emu.h for what the emulation does and does not catch).
#include "dwconv.emu.h"

// TensorFlow "SAME" padding along one axis: (before, output size).
static std::pair<int, int> same(int n, int k, int s) {
  int out = (n + s - 1) / s;
  int pad = std::max((out - 1) * s + k - n, 0);
  return {pad / 2, out};
}

void dwconv_case(int N, int C, int H, int W, int k, int stride, int relu6) {
  const int fail0 = g_fail;
  auto [pt, Ho] = same(H, k, stride);
  auto [pl, Wo] = same(W, k, stride);
  auto x = rand_bf16((size_t)N * C * H * W, -2, 2), w = rand_bf16((size_t)C * k * k), dyv = rand_bf16((size_t)N * C * Ho * Wo);
  std::vector<float> bias(C);
  for (int c = 0; c < C; ++c) bias[c] = 0.25f * (c % 5) - 0.5f;
  const size_t ny = (size_t)N * C * Ho * Wo, nx = (size_t)N * C * H * W;
  std::vector<bf16> y(ny), dx(nx);
  std::vector<float> dw((size_t)C * k * k, -7.f), db(C, -7.f);
  launch({(unsigned)((ny + 255) / 256)}, 256, dwconv_fwd, x.data(), w.data(), bias.data(), N, C, H, W, k, stride, pt, pl, Ho,
         Wo, relu6, y.data());
  auto X = [&](int n, int c, int iy, int ix) { return f64(x[(((size_t)n * C + c) * H + iy) * W + ix]); };
  std::vector<double> pre(ny);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int oy = 0; oy < Ho; ++oy)
        for (int ox = 0; ox < Wo; ++ox) {
          double acc = bias[c];
          for (int ky = 0; ky < k; ++ky)
            for (int kx = 0; kx < k; ++kx) {
              int iy = oy * stride + ky - pt, ix = ox * stride + kx - pl;
              if (iy >= 0 && iy < H && ix >= 0 && ix < W) acc += X(n, c, iy, ix) * f64(w[(size_t)c * k * k + ky * k + kx]);
            }
          size_t o = (((size_t)n * C + c) * Ho + oy) * Wo + ox;
          pre[o] = acc;
          double want = relu6 ? std::min(std::max(acc, 0.0), 6.0) : acc;
          CHECK(std::fabs(f64(y[o]) - want) <= 1e-2 * std::fabs(want) + 1e-2, "y n%d c%d (%d,%d) %f vs %f", n, c, oy, ox,
                f64(y[o]), want);
        }
  // The fused ReLU6's backward masks dy where the output was clamped.
  auto dy = dyv;
  if (relu6) launch({(unsigned)((ny + 255) / 256)}, 256, relu6_bwd, dy.data(), y.data(), (long long)ny);
  for (size_t o = 0; o < ny; ++o) {
    double v = f64(y[o]);
    double want = relu6 && !(v > 0 && v < 6) ? 0.0 : f64(dyv[o]);
    CHECK(f64(dy[o]) == want, "relu6_bwd [%zu]", o);
  }
  launch({(unsigned)((nx + 255) / 256)}, 256, dwconv_bwd_dx, dy.data(), w.data(), N, C, H, W, k, stride, pt, pl, Ho, Wo,
         dx.data());
  launch({(unsigned)(k * k + 1), (unsigned)C}, 256, dwconv_bwd_dw, x.data(), dy.data(), N, C, H, W, k, stride, pt, pl, Ho,
         Wo, dw.data(), db.data());
  // References by scattering each output's gradient (the transpose of the forward's gather).
  std::vector<double> rdx(nx, 0), rdw((size_t)C * k * k, 0), rdb(C, 0);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int oy = 0; oy < Ho; ++oy)
        for (int ox = 0; ox < Wo; ++ox) {
          double g = f64(dy[(((size_t)n * C + c) * Ho + oy) * Wo + ox]);
          rdb[c] += g;
          for (int ky = 0; ky < k; ++ky)
            for (int kx = 0; kx < k; ++kx) {
              int iy = oy * stride + ky - pt, ix = ox * stride + kx - pl;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              rdx[(((size_t)n * C + c) * H + iy) * W + ix] += g * f64(w[(size_t)c * k * k + ky * k + kx]);
              rdw[(size_t)c * k * k + ky * k + kx] += g * X(n, c, iy, ix);
            }
        }
  for (size_t i = 0; i < nx; ++i)
    CHECK(std::fabs(f64(dx[i]) - rdx[i]) <= 1e-2 * std::fabs(rdx[i]) + 1e-2, "dx[%zu] %f vs %f", i, f64(dx[i]), rdx[i]);
  for (size_t i = 0; i < rdw.size(); ++i)
    CHECK(std::fabs(dw[i] - rdw[i]) <= 1e-4 * std::fabs(rdw[i]) + 1e-4, "dw[%zu] %f vs %f", i, dw[i], rdw[i]);
  for (int c = 0; c < C; ++c) CHECK(std::fabs(db[c] - rdb[c]) <= 1e-4 * std::fabs(rdb[c]) + 1e-4, "db[%d] %f vs %f", c, db[c], rdb[c]);
  printf("case dwconv N%d C%d %dx%d k%d s%d relu6 %d: %s\n", N, C, H, W, k, stride, relu6, g_fail > fail0 ? "FAIL" : "ok");
}

// The dense convolutions' epilogue: bias, residual, ReLU6, against the same arithmetic in double.
void epilogue_case(int C, int P, int has_res, int relu6) {
  const int fail0 = g_fail;
  auto y = rand_bf16((size_t)C * P, -4, 8), res = rand_bf16((size_t)C * P, -2, 2);
  const auto y0 = y;
  std::vector<float> bias(C);
  for (int c = 0; c < C; ++c) bias[c] = 0.5f * (c % 3) - 0.5f;
  launch({(unsigned)(((size_t)C * P + 255) / 256)}, 256, channel_bias_act, y.data(), bias.data(), res.data(), C, P, has_res,
         relu6);
  for (int c = 0; c < C; ++c)
    for (int p = 0; p < P; ++p) {
      size_t i = (size_t)c * P + p;
      double want = f64(y0[i]) + bias[c] + (has_res ? f64(res[i]) : 0.0);
      if (relu6) want = std::min(std::max(want, 0.0), 6.0);
      CHECK(std::fabs(f64(y[i]) - want) <= 1e-2 * std::fabs(want) + 1e-3, "epilogue c%d p%d %f vs %f", c, p, f64(y[i]), want);
    }
  printf("case channel_bias_act C%d P%d res %d relu6 %d: %s\n", C, P, has_res, relu6, g_fail > fail0 ? "FAIL" : "ok");
}

int main() {
  epilogue_case(1, 1, 0, 0);
  epilogue_case(5, 49, 1, 0);
  epilogue_case(7, 300, 0, 1);
  epilogue_case(3, 17, 1, 1);
  dwconv_case(1, 1, 1, 1, 3, 1, 0);
  dwconv_case(2, 3, 7, 6, 3, 1, 1);
  dwconv_case(1, 4, 9, 8, 3, 2, 0);
  dwconv_case(2, 2, 12, 11, 5, 2, 1);
  dwconv_case(1, 3, 14, 14, 5, 1, 1);
  return g_fail ? 1 : 0;
}
