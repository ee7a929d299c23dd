// Emulated check of kernels/mincos_topk.cu against a double-precision reference (run by
// tests/kernels_emulated.rs; see emu.h for what the emulation does and does not catch).
#include "mincos_topk.emu.h"

#include <algorithm>
#include <numeric>

void run_case(int B, int P, int Pr, int C, int K, int reduce, int zero_shot, int nsplit, int variant) {
  const int fail0 = g_fail;
  if (zero_shot) Pr = P;
  auto t = rand_bf16((size_t)B * P * C);
  auto r = zero_shot ? t : rand_bf16((size_t)B * Pr * C);
  // a zero row to exercise inv = 0
  if (P > 3) for (int c = 0; c < C; ++c) t[(size_t)2 * C + c] = __float2bfloat16(0.f);
  // duplicate a reference row into a test row (cos 1) for nearest
  if (!zero_shot && P > 5 && Pr > 4) for (int c = 0; c < C; ++c) t[(size_t)5 * C + c] = r[(size_t)4 * C + c];
  // exact ties: reference row 70 (another tile) duplicates row 4 in every batch item
  if (!zero_shot && Pr > 70) for (int b = 0; b < B; ++b) for (int c = 0; c < C; ++c) r[((size_t)b * Pr + 70) * C + c] = r[((size_t)b * Pr + 4) * C + c];
  std::vector<float> it(B * P), ir(B * Pr);
  launch({(unsigned)((B * P + 7) / 8)}, 256, mincos_inv_norms, t.data(), it.data(), B * P, C);
  launch({(unsigned)((B * Pr + 7) / 8)}, 256, mincos_inv_norms, r.data(), ir.data(), B * Pr, C);
  std::vector<float> pv((size_t)nsplit * B * P, 12345.f); std::vector<int> pi((size_t)nsplit * B * P, -7);
  dim3e grid{(unsigned)((P + 63) / 64), (unsigned)B, (unsigned)nsplit};
  if (variant == 1) launch(grid, 256, mincos_reduce_v1, t.data(), r.data(), it.data(), ir.data(), B, P, Pr, C, reduce, zero_shot, pv.data(), pi.data());
  else launch(grid, 128, mincos_reduce_v2, t.data(), r.data(), it.data(), ir.data(), B, P, Pr, C, reduce, zero_shot, pv.data(), pi.data());
  std::vector<float> sim(B * P), amap(B * P); std::vector<int> idx(B * P), topk(B * K, -9);
  launch({(unsigned)B}, 256, mincos_merge_topk, pv.data(), pi.data(), nsplit, B, P, reduce, K, sim.data(), idx.data(), amap.data(), topk.data());
  std::vector<bf16> vsel((size_t)B * K * C), dd((size_t)B * K * C);
  launch({(unsigned)K, (unsigned)B}, 128, mincos_gather, t.data(), r.data(), topk.data(), idx.data(), P, Pr, C, K, vsel.data(), dd.data());
  // reference (double)
  for (int b = 0; b < B; ++b) {
    std::vector<double> s(P); std::vector<int> a(P); std::vector<double> second(P);
    for (int i = 0; i < P; ++i) {
      double ni = 0; for (int c = 0; c < C; ++c) ni += f64(t[((size_t)b * P + i) * C + c]) * f64(t[((size_t)b * P + i) * C + c]);
      ni = std::sqrt(ni);
      double best = reduce == 0 ? -INFINITY : INFINITY, sec = best; int arg = 0;
      for (int j = 0; j < Pr; ++j) {
        if (zero_shot && i == j) continue;
        double nj = 0, dot = 0;
        for (int c = 0; c < C; ++c) { double x = f64(r[((size_t)b * Pr + j) * C + c]); nj += x * x; dot += x * f64(t[((size_t)b * P + i) * C + c]); }
        nj = std::sqrt(nj);
        double cs = (ni > 0 ? 1 / ni : 0) * (nj > 0 ? 1 / nj : 0) * dot;
        bool better = reduce == 0 ? cs > best : cs < best;
        if (better) { sec = best; best = cs; arg = j; } else if (reduce == 0 ? cs > sec : cs < sec) sec = cs;
      }
      if (!std::isfinite(best)) { best = 1; arg = 0; }
      s[i] = best; a[i] = arg; second[i] = sec;
      float gs = sim[b * P + i];
      CHECK(std::fabs(gs - best) < 1e-5, "b%d i%d sim %f vs %f", b, i, gs, best);
      CHECK(std::fabs(amap[b * P + i] - (1 - best)) < 1e-5, "map");
      if (std::fabs(best - sec) > 1e-5 || best == sec) CHECK(idx[b * P + i] == arg, "b%d i%d idx %d vs %d (%f %f)", b, i, idx[b * P + i], arg, best, sec);
    }
    std::vector<int> order(P); std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return s[x] < s[y]; });
    for (int k = 0; k < K; ++k) {
      int got = topk[b * K + k];
      if (k >= P) { CHECK(got == -1, "pad %d", got); continue; }
      int want = order[k];
      if (got != want) CHECK(got >= 0 && std::fabs(s[got] - s[want]) < 1e-5, "b%d topk[%d] %d (%f) vs %d (%f)", b, k, got, s[got < 0 ? 0 : got], want, s[want]);
      if (got >= 0) {
        int j = idx[b * P + got];
        for (int c = 0; c < C; ++c) {
          float tv = f64(t[((size_t)b * P + got) * C + c]);
          CHECK(vsel[((size_t)b * K + k) * C + c].x == t[((size_t)b * P + got) * C + c].x, "vsel");
          CHECK(dd[((size_t)b * K + k) * C + c].x == __float2bfloat16(tv - (float)f64(r[((size_t)b * Pr + j) * C + c])).x, "d");
        }
      }
    }
  }
  // sim ascending in topk
  printf("case B%d P%d Pr%d C%d K%d reduce%d zs%d split%d v%d: %s\n", B, P, Pr, C, K, reduce, zero_shot, nsplit, variant, g_fail > fail0 ? "FAIL" : "ok");
}

int main() {
  run_case(2, 100, 77, 40, 5, 0, 0, 1, 2);
  run_case(2, 100, 77, 40, 5, 0, 0, 1, 1);
  run_case(1, 70, 130, 40, 9, 1, 0, 2, 2);
  run_case(1, 70, 130, 37, 9, 1, 0, 3, 1);
  run_case(2, 67, 0, 24, 6, 0, 1, 1, 2);
  run_case(1, 67, 0, 37, 6, 1, 1, 2, 1);
  run_case(1, 3, 2, 8, 5, 0, 0, 1, 2);  // K > P: pads
  run_case(1, 1, 0, 8, 1, 0, 1, 1, 2);  // zero-shot P=1
  run_case(1, 130, 200, 72, 3, 0, 0, 4, 2);  // nsplit > tiles for some splits
  return g_fail != 0;
}
