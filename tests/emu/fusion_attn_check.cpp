// Emulated check of kernels/fusion_attn.cu against a double-precision reference (run by
// tests/kernels_emulated.rs; see emu.h for what the emulation does and does not catch).
#include "fusion_attn.emu.h"


void run_case(int B, int L, int S, int H, int D) {
  const int fail0 = g_fail;
  size_t nq = (size_t)B * L * H * D, nk = (size_t)B * S * H * D;
  auto q = rand_bf16(nq, -2, 2), k = rand_bf16(nk, -2, 2), v = rand_bf16(nk), dout = rand_bf16(nq);
  float scale = 1.0f / std::sqrt((float)D);
  std::vector<bf16> out(nq); std::vector<float> lse((size_t)B * H * L), delta((size_t)B * H * L);
  launch({(unsigned)((L + 3) / 4), (unsigned)H, (unsigned)B}, 128, fusion_attn_fwd, q.data(), k.data(), v.data(), B, L, S, H, D, scale, out.data(), lse.data());
  launch({(unsigned)((B * L * H + 7) / 8)}, 256, fusion_attn_bwd_delta, out.data(), dout.data(), B, L, H, D, delta.data());
  std::vector<bf16> dq(nq), dk(nk), dv(nk);
  launch({(unsigned)((L + 3) / 4), (unsigned)H, (unsigned)B}, 128, fusion_attn_bwd_dq, q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(), B, L, S, H, D, scale, dq.data());
  launch({(unsigned)((S + 3) / 4), (unsigned)H, (unsigned)B}, 128, fusion_attn_bwd_dkdv, q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(), B, L, S, H, D, scale, dk.data(), dv.data());
  auto at = [&](int N, int b, int i, int h) { return (((size_t)b * N + i) * H + h) * D; };
  std::vector<double> rdq(nq, 0), rdk(nk, 0), rdv(nk, 0);
  double maxq = 0, maxk = 0, maxv = 0;
  for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int i = 0; i < L; ++i) {
    std::vector<double> s(S), p(S);
    double m = -INFINITY;
    for (int j = 0; j < S; ++j) { double acc = 0; for (int d = 0; d < D; ++d) acc += f64(q[at(L, b, i, h) + d]) * f64(k[at(S, b, j, h) + d]); s[j] = acc * scale; m = std::max(m, s[j]); }
    double l = 0; for (int j = 0; j < S; ++j) { p[j] = std::exp(s[j] - m); l += p[j]; }
    double rl = m + std::log(l);
    CHECK(std::fabs(lse[((size_t)b * H + h) * L + i] - rl) < 1e-4 * std::max(1.0, std::fabs(rl)), "lse %f vs %f", lse[((size_t)b * H + h) * L + i], rl);
    std::vector<double> o(D, 0);
    for (int j = 0; j < S; ++j) for (int d = 0; d < D; ++d) o[d] += p[j] / l * f64(v[at(S, b, j, h) + d]);
    double delta_r = 0;
    for (int d = 0; d < D; ++d) {
      double got = f64(out[at(L, b, i, h) + d]);
      CHECK(std::fabs(got - o[d]) < 1e-2 * std::fabs(o[d]) + 2e-3, "out b%d h%d i%d d%d %f vs %f", b, h, i, d, got, o[d]);
      delta_r += f64(dout[at(L, b, i, h) + d]) * o[d];
    }
    CHECK(std::fabs(delta[((size_t)b * H + h) * L + i] - delta_r) < 2e-2, "delta");
    for (int j = 0; j < S; ++j) {
      double pj = p[j] / l, dp = 0;
      for (int d = 0; d < D; ++d) dp += f64(dout[at(L, b, i, h) + d]) * f64(v[at(S, b, j, h) + d]);
      double ds = pj * (dp - delta_r);
      for (int d = 0; d < D; ++d) {
        rdq[at(L, b, i, h) + d] += scale * ds * f64(k[at(S, b, j, h) + d]);
        rdk[at(S, b, j, h) + d] += scale * ds * f64(q[at(L, b, i, h) + d]);
        rdv[at(S, b, j, h) + d] += pj * f64(dout[at(L, b, i, h) + d]);
      }
    }
  }
  for (auto x : rdq) maxq = std::max(maxq, std::fabs(x));
  for (auto x : rdk) maxk = std::max(maxk, std::fabs(x));
  for (auto x : rdv) maxv = std::max(maxv, std::fabs(x));
  double eq = 0, ek = 0, ev = 0;
  for (size_t i = 0; i < nq; ++i) eq = std::max(eq, std::fabs(f64(dq[i]) - rdq[i]));
  for (size_t i = 0; i < nk; ++i) { ek = std::max(ek, std::fabs(f64(dk[i]) - rdk[i])); ev = std::max(ev, std::fabs(f64(dv[i]) - rdv[i])); }
  CHECK(eq <= 2e-2 * maxq, "dq err %g max %g", eq, maxq);
  CHECK(ek <= 2e-2 * maxk, "dk err %g max %g", ek, maxk);
  CHECK(ev <= 2e-2 * maxv, "dv err %g max %g", ev, maxv);
  printf("case B%d L%d S%d H%d D%d: dq %.2e/%.2e dk %.2e/%.2e dv %.2e/%.2e %s\n", B, L, S, H, D, eq, maxq, ek, maxk, ev, maxv, g_fail > fail0 ? "FAIL" : "ok");
}
int main() {
  run_case(1, 1, 1, 1, 2);
  run_case(2, 5, 33, 3, 18);
  run_case(1, 37, 70, 2, 64);
  run_case(1, 6, 40, 1, 256);
  run_case(1, 3, 5, 2, 130);
  return g_fail != 0;
}
