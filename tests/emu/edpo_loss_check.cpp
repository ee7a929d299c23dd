// Emulated check of kernels/edpo_loss.cu against a double-precision reference (run by
// tests/kernels_emulated.rs; see emu.h for what the emulation does and does not catch).
#include "edpo_loss.emu.h"


void run_case(int pairs, int T, int C, int V, int nsplit, int ans, bool use_mask) {
  const int fail0 = g_fail;
  int N = 2 * pairs + 1;  // one extra sequence shared by two pairs
  int R = N * T;
  auto h = rand_bf16((size_t)R * C, -1, 1), w = rand_bf16((size_t)V * C, -1, 1);
  std::vector<int> tg(R); std::vector<unsigned char> mask(R);
  for (int r = 0; r < R; ++r) { tg[r] = (r * 7919 + 13) % V; mask[r] = (r % T) >= T - ans; }
  if (!use_mask) std::fill(mask.begin(), mask.end(), 1);
  const unsigned char* mk = use_mask ? mask.data() : nullptr;
  std::vector<float> pm((size_t)nsplit * R, 999.f), ps((size_t)nsplit * R, 999.f), tl(R, 999.f), lse(R), logp(R), seq(N);
  launch({(unsigned)((R + 63) / 64), (unsigned)nsplit}, 128, edpo_logits_lse_partial, h.data(), w.data(), tg.data(), mk, R, V, C, pm.data(), ps.data(), tl.data());
  launch({(unsigned)N}, 256, edpo_lse_combine_seqsum, pm.data(), ps.data(), tl.data(), mk, nsplit, N, T, lse.data(), logp.data(), seq.data());
  // reference
  std::vector<double> rl(R, 0), rlp(R, 0), rseq(N, 0);
  for (int r = 0; r < R; ++r) {
    if (!mask[r]) continue;
    std::vector<double> z(V); double m = -INFINITY;
    for (int v = 0; v < V; ++v) { double a = 0; for (int c = 0; c < C; ++c) a += f64(h[(size_t)r * C + c]) * f64(w[(size_t)v * C + c]); z[v] = a; m = std::max(m, a); }
    double s = 0; for (int v = 0; v < V; ++v) s += std::exp(z[v] - m);
    rl[r] = m + std::log(s); rlp[r] = z[tg[r]] - rl[r]; rseq[r / T] += rlp[r];
    CHECK(std::fabs(lse[r] - rl[r]) < 1e-4 * std::max(1.0, std::fabs(rl[r])), "lse r%d %f vs %f", r, lse[r], rl[r]);
    CHECK(std::fabs(logp[r] - rlp[r]) < 2e-4 * std::max(1.0, std::fabs(rlp[r])), "logp r%d %f vs %f", r, logp[r], rlp[r]);
  }
  for (int r = 0; r < R; ++r) if (!mask[r]) CHECK(logp[r] == 0 && lse[r] == 0, "masked row %d", r);
  for (int n = 0; n < N; ++n) CHECK(std::fabs(seq[n] - rseq[n]) < 1e-4 * std::max(1.0, std::fabs(rseq[n])), "seq %d %f vs %f", n, seq[n], rseq[n]);
  // loss
  int P = pairs + 1;
  std::vector<int> ch(P), rj(P); std::vector<float> dH(P), refseq(N);
  for (int p = 0; p < pairs; ++p) { ch[p] = 2 * p; rj[p] = 2 * p + 1; dH[p] = 0.3f * (p - 1); }
  ch[pairs] = 2 * pairs; rj[pairs] = 1; dH[pairs] = -0.5f;  // sequence 1 rejected twice
  for (int n = 0; n < N; ++n) refseq[n] = (float)rseq[n] + 0.7f * (n % 3) - 0.5f;
  float beta = 0.3f, eta = 0.4f;
  std::vector<float> margin(P), lp(P), dld(P), loss(1), gseq(N);
  launch({1}, 256, edpo_loss_fwd, seq.data(), refseq.data(), ch.data(), rj.data(), dH.data(), P, N, beta, eta, margin.data(), lp.data(), dld.data(), loss.data(), gseq.data());
  std::vector<double> rg(N, 0); double rloss = 0;
  for (int p = 0; p < P; ++p) {
    double d = beta * ((seq[ch[p]] - refseq[ch[p]]) - (seq[rj[p]] - refseq[rj[p]])) - eta * std::fabs(dH[p]);
    double l = std::log1p(std::exp(-d)); double g = -1.0 / (1.0 + std::exp(d)) / P;
    rloss += l / P; rg[ch[p]] += beta * g; rg[rj[p]] -= beta * g;
    CHECK(std::fabs(margin[p] - d) < 1e-5, "margin"); CHECK(std::fabs(lp[p] - l) < 1e-5, "pair loss");
  }
  CHECK(std::fabs(loss[0] - rloss) < 1e-5, "loss %f vs %f", loss[0], rloss);
  for (int n = 0; n < N; ++n) CHECK(std::fabs(gseq[n] - rg[n]) < 1e-6, "gseq %d %g vs %g", n, gseq[n], rg[n]);
  // backward: dz for chunk [r0, r0+rows)
  int r0 = std::max(0, T - ans - 3), rows = std::min(R - r0, T + 70);
  std::vector<bf16> dz((size_t)rows * V, __float2bfloat16(777.f));
  launch({(unsigned)((rows + 63) / 64), (unsigned)((V + 63) / 64)}, 128, edpo_dlogits, h.data(), w.data(), tg.data(), mk, lse.data(), gseq.data(), r0, rows, T, V, C, dz.data());
  double maxe = 0, maxd = 0;
  for (int lr = 0; lr < rows; ++lr) {
    int r = r0 + lr;
    for (int v = 0; v < V; ++v) {
      double want = 0;
      if (mask[r]) { double a = 0; for (int c = 0; c < C; ++c) a += f64(h[(size_t)r * C + c]) * f64(w[(size_t)v * C + c]); want = rg[r / T] * ((v == tg[r]) - std::exp(a - rl[r])); }
      double got = f64(dz[(size_t)lr * V + v]);
      maxe = std::max(maxe, std::fabs(got - want)); maxd = std::max(maxd, std::fabs(want));
      CHECK(std::fabs(got - want) < 1e-2 * std::fabs(want) + 1e-7, "dz r%d v%d %g vs %g", r, v, got, want);
    }
  }
  printf("case pairs%d T%d C%d V%d split%d ans%d mask%d: dz err %.2e (max %.2e) %s\n", pairs, T, C, V, nsplit, ans, use_mask, maxe, maxd, g_fail > fail0 ? "FAIL" : "ok");
}
int main() {
  run_case(1, 5, 8, 7, 1, 3, true);
  run_case(2, 150, 40, 1000, 3, 20, true);   // fully masked tiles in the middle
  run_case(1, 67, 72, 130, 5, 67, false);    // no mask; more splits than needed
  run_case(1, 33, 24, 64, 1, 10, true);
  return g_fail != 0;
}
