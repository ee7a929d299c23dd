// Emulated check of kernels/llm_ops.cu against double-precision references (run by
// tests/kernels_emulated.rs; see emu.h for what the emulation does and does not catch).
#include "llm_ops.emu.h"

void rmsnorm_case(int rows, int C, int chunk_rows, int accumulate) {
  const int fail0 = g_fail;
  const float eps = 1e-5f;
  auto x = rand_bf16((size_t)rows * C, -2, 2), w = rand_bf16(C, 0.5, 1.5), dy = rand_bf16((size_t)rows * C);
  auto dx = rand_bf16((size_t)rows * C);
  const auto dx0 = dx;
  std::vector<bf16> y((size_t)rows * C);
  std::vector<float> rstd(rows, -1.f);
  launch({(unsigned)((rows + 7) / 8)}, 256, rmsnorm_fwd, x.data(), w.data(), rows, C, eps, y.data(), rstd.data());
  launch({(unsigned)((rows + 7) / 8)}, 256, rmsnorm_bwd_dx, x.data(), w.data(), dy.data(), rstd.data(), rows, C, accumulate, dx.data());
  const int chunks = (rows + chunk_rows - 1) / chunk_rows;
  std::vector<float> part((size_t)chunks * C, 777.f), dw(C, 0.25f);
  launch({(unsigned)((C + 255) / 256), (unsigned)chunks}, 256, rmsnorm_bwd_dw_partial, x.data(), dy.data(), rstd.data(), rows, C, chunk_rows, part.data());
  launch({(unsigned)((C + 255) / 256)}, 256, sum_rows_f32, part.data(), chunks, C, dw.data());
  std::vector<double> rdw(C, 0.25);
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int j = 0; j < C; ++j) ss += f64(x[(size_t)r * C + j]) * f64(x[(size_t)r * C + j]);
    double rs = 1 / std::sqrt(ss / C + eps), dot = 0;
    CHECK(std::fabs(rstd[r] - rs) < 1e-5 * rs, "rstd[%d] %f vs %f", r, rstd[r], rs);
    for (int j = 0; j < C; ++j) {
      size_t i = (size_t)r * C + j;
      double want = f64(x[i]) * rs * f64(w[j]);
      CHECK(std::fabs(f64(y[i]) - want) <= 1e-2 * std::fabs(want) + 1e-6, "y[%d,%d] %f vs %f", r, j, f64(y[i]), want);
      dot += f64(dy[i]) * f64(w[j]) * f64(x[i]);
      rdw[j] += f64(dy[i]) * f64(x[i]) * rs;
    }
    for (int j = 0; j < C; ++j) {
      size_t i = (size_t)r * C + j;
      double want = rs * f64(w[j]) * f64(dy[i]) - rs * rs * rs * f64(x[i]) * dot / C + (accumulate ? f64(dx0[i]) : 0);
      CHECK(std::fabs(f64(dx[i]) - want) <= 1e-2 * std::fabs(want) + 1e-3, "dx[%d,%d] %f vs %f", r, j, f64(dx[i]), want);
    }
  }
  for (int j = 0; j < C; ++j) CHECK(std::fabs(dw[j] - rdw[j]) <= 1e-4 * (1 + std::fabs(rdw[j])), "dw[%d] %f vs %f", j, dw[j], rdw[j]);
  printf("case rmsnorm rows%d C%d chunk%d acc%d: %s\n", rows, C, chunk_rows, accumulate, g_fail > fail0 ? "FAIL" : "ok");
}

void swiglu_case(long long n, int accumulate) {
  const int fail0 = g_fail;
  auto g = rand_bf16(n, -6, 6), u = rand_bf16(n, -2, 2), dy = rand_bf16(n), dg = rand_bf16(n), du = rand_bf16(n);
  const auto dg0 = dg, du0 = du;
  std::vector<bf16> y(n);
  unsigned blocks = (unsigned)((n + 255) / 256);
  launch({blocks}, 256, swiglu_fwd, g.data(), u.data(), n, y.data());
  launch({blocks}, 256, swiglu_bwd, dy.data(), g.data(), u.data(), n, accumulate, dg.data(), du.data());
  for (long long i = 0; i < n; ++i) {
    double gv = f64(g[i]), s = 1 / (1 + std::exp(-gv)), silu = gv * s;
    double wy = silu * f64(u[i]);
    CHECK(std::fabs(f64(y[i]) - wy) <= 1e-2 * std::fabs(wy) + 1e-6, "y[%lld] %f vs %f", i, f64(y[i]), wy);
    double wg = f64(dy[i]) * f64(u[i]) * s * (1 + gv * (1 - s)) + (accumulate ? f64(dg0[i]) : 0);
    double wu = f64(dy[i]) * silu + (accumulate ? f64(du0[i]) : 0);
    CHECK(std::fabs(f64(dg[i]) - wg) <= 1e-2 * std::fabs(wg) + 1e-3, "dg[%lld] %f vs %f", i, f64(dg[i]), wg);
    CHECK(std::fabs(f64(du[i]) - wu) <= 1e-2 * std::fabs(wu) + 1e-3, "du[%lld] %f vs %f", i, f64(du[i]), wu);
  }
  printf("case swiglu n%lld acc%d: %s\n", n, accumulate, g_fail > fail0 ? "FAIL" : "ok");
}

void adamw_case(long long n, int steps, float wd) {
  const int fail0 = g_fail;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> x(n), g(n), m(n, 0), v(n, 0);
  for (auto& e : x) e = d(rng);
  std::vector<double> rx(x.begin(), x.end()), rm(n, 0), rv(n, 0);
  const double lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  for (int t = 1; t <= steps; ++t) {
    for (auto& e : g) e = d(rng);
    float step_size = (float)(lr / (1 - std::pow(b1, t))), bc2 = (float)std::sqrt(1 - std::pow(b2, t));
    float decay = (float)(1 - lr * wd);
    launch({(unsigned)((n + 255) / 256)}, 256, adamw_step, x.data(), g.data(), m.data(), v.data(), n, (float)b1,
           (float)(1 - b1), (float)b2, (float)(1 - b2), step_size, bc2, (float)eps, decay);
    for (long long i = 0; i < n; ++i) {
      rx[i] *= 1 - lr * wd;
      rm[i] = b1 * rm[i] + (1 - b1) * g[i];
      rv[i] = b2 * rv[i] + (1 - b2) * (double)g[i] * g[i];
      rx[i] -= lr / (1 - std::pow(b1, t)) * rm[i] / (std::sqrt(rv[i]) / std::sqrt(1 - std::pow(b2, t)) + eps);
    }
  }
  for (long long i = 0; i < n; ++i) CHECK(std::fabs(x[i] - rx[i]) <= 1e-5, "x[%lld] %f vs %f", i, x[i], rx[i]);
  printf("case adamw n%lld steps%d wd%g: %s\n", n, steps, wd, g_fail > fail0 ? "FAIL" : "ok");
}

// adamw_step_bf16 and adamw_step_bf16w must do adamw_step's arithmetic from the bf16-rounded gradient and keep w = bf16(x).
void adamw_bf16_case(long long n, int steps, float wd) {
  const int fail0 = g_fail;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> x(n), m(n, 0), v(n, 0), x2, m2(n, 0), v2(n, 0), g32(n);
  for (auto& e : x) e = d(rng);
  x2 = x;
  std::vector<bf16> g(n), w(n), w3(n);
  std::vector<float> x3 = x, m3(n, 0), v3(n, 0);
  const float clip[2] = {1.f, 0.f};
  for (int t = 1; t <= steps; ++t) {
    for (long long i = 0; i < n; ++i) { g[i] = __float2bfloat16(d(rng)); g32[i] = __bfloat162float(g[i]); }
    float step_size = (float)(1e-2 / (1 - std::pow(0.9, t))), bc2 = (float)std::sqrt(1 - std::pow(0.999, t));
    float decay = 1 - 1e-2f * wd;
    unsigned blocks = (unsigned)((n + 255) / 256);
    launch({blocks}, 256, adamw_step_bf16, x.data(), g.data(), m.data(), v.data(), w.data(), n, 0.9f, 0.1f, 0.999f,
           0.001f, step_size, bc2, 1e-8f, decay, clip);
    launch({blocks}, 256, adamw_step_bf16w, x3.data(), g32.data(), m3.data(), v3.data(), w3.data(), n, 0.9f, 0.1f,
           0.999f, 0.001f, step_size, bc2, 1e-8f, decay, clip);
    launch({blocks}, 256, adamw_step, x2.data(), g32.data(), m2.data(), v2.data(), n, 0.9f, 0.1f, 0.999f, 0.001f,
           step_size, bc2, 1e-8f, decay);
  }
  for (long long i = 0; i < n; ++i) {
    CHECK(x[i] == x2[i] && m[i] == m2[i] && v[i] == v2[i], "x[%lld] %f vs %f", i, x[i], x2[i]);
    CHECK(w[i].x == __float2bfloat16(x[i]).x, "w[%lld] is not bf16(x)", i);
    CHECK(x3[i] == x2[i] && w3[i].x == w[i].x, "adamw_step_bf16w x[%lld] %f vs %f", i, x3[i], x2[i]);
  }
  printf("case adamw_bf16 n%lld steps%d wd%g: %s\n", n, steps, wd, g_fail > fail0 ? "FAIL" : "ok");
}

// The clipped update: the gradient times clip[0] (against adamw_step on the pre-scaled gradient), and
// clip[1] ≠ 0 leaves x, m, v and w untouched.
void adamw_clip_case(long long n, float factor) {
  const int fail0 = g_fail;
  std::mt19937 rng(13);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> x(n), m(n, 0.1f), v(n, 0.2f), g32(n), gs(n);
  std::vector<bf16> g(n), w(n);
  for (long long i = 0; i < n; ++i) {
    x[i] = d(rng);
    g[i] = __float2bfloat16(d(rng));
    g32[i] = __bfloat162float(g[i]);
    gs[i] = g32[i] * factor;
  }
  auto x0 = x, x2 = x, m2 = m, v2 = v, x3 = x, m3 = m, v3 = v;
  std::vector<bf16> w3(n);
  const float clip[2] = {factor, 0.f}, skip[2] = {factor, 1.f};
  unsigned blocks = (unsigned)((n + 255) / 256);
  launch({blocks}, 256, adamw_step_bf16, x.data(), g.data(), m.data(), v.data(), w.data(), n, 0.9f, 0.1f, 0.999f,
         0.001f, 0.01f, 0.04f, 1e-8f, 0.999f, clip);
  launch({blocks}, 256, adamw_step, x2.data(), gs.data(), m2.data(), v2.data(), n, 0.9f, 0.1f, 0.999f, 0.001f, 0.01f,
         0.04f, 1e-8f, 0.999f);
  for (long long i = 0; i < n; ++i) w3[i] = __float2bfloat16(123.f);
  launch({blocks}, 256, adamw_step_bf16w, x3.data(), g32.data(), m3.data(), v3.data(), w3.data(), n, 0.9f, 0.1f,
         0.999f, 0.001f, 0.01f, 0.04f, 1e-8f, 0.999f, skip);
  for (long long i = 0; i < n; ++i) {
    CHECK(x[i] == x2[i] && m[i] == m2[i] && v[i] == v2[i], "clipped x[%lld] %f vs %f", i, x[i], x2[i]);
    CHECK(x3[i] == x0[i] && m3[i] == 0.1f && v3[i] == 0.2f && w3[i].x == __float2bfloat16(123.f).x,
          "a skipped step changed element %lld", i);
  }
  printf("case adamw_clip n%lld factor%g: %s\n", n, factor, g_fail > fail0 ? "FAIL" : "ok");
}

// Σx² in SUMSQ_BLOCKS partials, summed by sum_rows_f32 into a running total, then clip_factor.
void sumsq_clip_case(long long n, float max_norm, bool poison) {
  const int fail0 = g_fail;
  auto xb = rand_bf16(n, -2, 2);
  std::vector<float> xf(n);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> d(-1, 1);
  for (auto& e : xf) e = d(rng);
  if (poison) xf[n / 2] = INFINITY;
  std::vector<float> part(SUMSQ_BLOCKS, 777.f), total(1, 0.5f), out(3, -1.f);
  launch({SUMSQ_BLOCKS}, 256, sumsq_partial_bf16, xb.data(), n, part.data());
  launch({1}, 256, sum_rows_f32, part.data(), SUMSQ_BLOCKS, 1, total.data());
  launch({SUMSQ_BLOCKS}, 256, sumsq_partial_f32, xf.data(), n, part.data());
  launch({1}, 256, sum_rows_f32, part.data(), SUMSQ_BLOCKS, 1, total.data());
  launch({1}, 32, clip_factor, total.data(), max_norm, out.data());
  double want = 0.5;
  for (long long i = 0; i < n; ++i) want += f64(xb[i]) * f64(xb[i]) + (double)xf[i] * xf[i];
  if (poison) {
    CHECK(out[1] == 1.f && out[0] == 1.f, "a non-finite norm must skip: [%f %f %f]", out[0], out[1], out[2]);
  } else {
    CHECK(std::fabs(total[0] - want) <= 1e-5 * want, "sumsq %f vs %f", total[0], want);
    double norm = std::sqrt(want), f = (max_norm > 0 && norm > max_norm) ? max_norm / (norm + 1e-6) : 1.0;
    CHECK(std::fabs(out[2] - norm) <= 1e-5 * norm && std::fabs(out[0] - f) <= 1e-5 * f && out[1] == 0.f,
          "clip [%f %f %f] vs factor %f norm %f", out[0], out[1], out[2], f, norm);
  }
  printf("case sumsq_clip n%lld max%g poison%d: %s\n", n, max_norm, (int)poison, g_fail > fail0 ? "FAIL" : "ok");
}

int main() {
  rmsnorm_case(1, 1, 1, 0);
  rmsnorm_case(5, 37, 2, 1);
  rmsnorm_case(19, 300, 7, 0);
  rmsnorm_case(9, 576, 64, 1);
  swiglu_case(1, 0);
  swiglu_case(1000, 1);
  swiglu_case(777, 0);
  adamw_case(1, 1, 0.f);
  adamw_case(1000, 5, 0.1f);
  adamw_bf16_case(1, 1, 0.f);
  adamw_bf16_case(777, 4, 0.1f);
  adamw_clip_case(300, 0.25f);
  // Each case launches 2 × SUMSQ_BLOCKS emulated blocks: few cases keep the check quick.
  sumsq_clip_case(70001, 10.f, false);
  sumsq_clip_case(5000, 0.f, false);
  sumsq_clip_case(999, 1.f, true);
  return g_fail ? 1 : 0;
}
