// Emulated check of kernels/llm_attn.cu against double-precision references (run by
// tests/kernels_emulated.rs; see emu.h for what the emulation does and does not catch).
#include "llm_attn.emu.h"

// RoPE forward against the rotation in double, then the backward (sign −1) must undo it.
void rope_case(int rows, int T, int heads, int D, int start) {
  const int fail0 = g_fail;
  const int half = D / 2, max_pos = T + start;
  std::vector<float> cs, sn;
  rope_tables(max_pos, D, cs, sn);
  auto x = rand_bf16((size_t)rows * heads * D, -2, 2);
  const auto x0 = x;
  unsigned blocks = (unsigned)(((long long)rows * heads * half + 255) / 256);
  launch({blocks}, 256, rope_pairs, x.data(), cs.data(), sn.data(), rows, T, heads, D, start, 1.f);
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < half; ++i) {
        size_t at = ((size_t)r * heads + h) * D + 2 * i, t = (size_t)(r % T + start) * half + i;
        double a = f64(x0[at]), b = f64(x0[at + 1]);
        double w0 = a * cs[t] - b * sn[t], w1 = a * sn[t] + b * cs[t];
        CHECK(std::fabs(f64(x[at]) - w0) <= 1e-2 * std::fabs(w0) + 1e-3, "rope r%d h%d i%d %f vs %f", r, h, i, f64(x[at]), w0);
        CHECK(std::fabs(f64(x[at + 1]) - w1) <= 1e-2 * std::fabs(w1) + 1e-3, "rope r%d h%d i%d (odd)", r, h, i);
      }
  launch({blocks}, 256, rope_pairs, x.data(), cs.data(), sn.data(), rows, T, heads, D, start, -1.f);
  for (size_t i = 0; i < x.size(); ++i)
    CHECK(std::fabs(f64(x[i]) - f64(x0[i])) <= 2e-2 * std::fabs(f64(x0[i])) + 2e-3, "rope round trip [%zu]", i);
  printf("case rope rows%d T%d heads%d D%d start%d: %s\n", rows, T, heads, D, start, g_fail > fail0 ? "FAIL" : "ok");
}

// Causal grouped-query attention, forward and backward, against the softmax in double.
void attn_case(int B, int T, int H, int Hkv, int D) {
  const int fail0 = g_fail;
  const int group = H / Hkv;
  size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * Hkv * D;
  auto q = rand_bf16(nq, -2, 2), k = rand_bf16(nk, -2, 2), v = rand_bf16(nk), dout = rand_bf16(nq);
  float scale = 1.0f / std::sqrt((float)D);
  std::vector<bf16> out(nq);
  std::vector<float> lse((size_t)B * H * T, -7.f), delta((size_t)B * H * T);
  unsigned qblocks = (unsigned)((T + 3) / 4);
  launch({qblocks, (unsigned)H, (unsigned)B}, 128, causal_attn_fwd, q.data(), k.data(), v.data(), B, T, H, Hkv, D, scale,
         out.data(), lse.data());
  // delta = Σ dout·out (fusion_attn_bwd_delta's job on the device; checked in fusion_attn_check).
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        double acc = 0;
        for (int d = 0; d < D; ++d) acc += f64(out[(((size_t)b * T + t) * H + h) * D + d]) * f64(dout[(((size_t)b * T + t) * H + h) * D + d]);
        delta[((size_t)b * H + h) * T + t] = (float)acc;
      }
  std::vector<bf16> dq(nq), dk(nk), dv(nk);
  launch({qblocks, (unsigned)H, (unsigned)B}, 128, causal_attn_bwd_dq, q.data(), k.data(), v.data(), dout.data(),
         lse.data(), delta.data(), B, T, H, Hkv, D, scale, dq.data());
  launch({qblocks, (unsigned)Hkv, (unsigned)B}, 128, causal_attn_bwd_dkdv, q.data(), k.data(), v.data(), dout.data(),
         lse.data(), delta.data(), B, T, H, Hkv, D, scale, dk.data(), dv.data());
  auto qa = [&](int b, int t, int h) { return (((size_t)b * T + t) * H + h) * D; };
  auto ka = [&](int b, int t, int g) { return (((size_t)b * T + t) * Hkv + g) * D; };
  std::vector<double> rdq(nq, 0), rdk(nk, 0), rdv(nk, 0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < T; ++i) {
        const int g = h / group;
        std::vector<double> s(i + 1), p(i + 1);
        double m = -INFINITY;
        for (int j = 0; j <= i; ++j) {
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += f64(q[qa(b, i, h) + d]) * f64(k[ka(b, j, g) + d]);
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        double l = 0;
        for (int j = 0; j <= i; ++j) l += p[j] = std::exp(s[j] - m);
        double rl = m + std::log(l), got_lse = lse[((size_t)b * H + h) * T + i];
        CHECK(std::fabs(got_lse - rl) < 1e-4 * std::max(1.0, std::fabs(rl)), "lse b%d h%d i%d %f vs %f", b, h, i, got_lse, rl);
        std::vector<double> o(D, 0);
        for (int j = 0; j <= i; ++j)
          for (int d = 0; d < D; ++d) o[d] += p[j] / l * f64(v[ka(b, j, g) + d]);
        double delta_r = 0;
        for (int d = 0; d < D; ++d) {
          double got = f64(out[qa(b, i, h) + d]);
          CHECK(std::fabs(got - o[d]) < 1e-2 * std::fabs(o[d]) + 2e-3, "out b%d h%d i%d d%d %f vs %f", b, h, i, d, got, o[d]);
          delta_r += f64(dout[qa(b, i, h) + d]) * f64(out[qa(b, i, h) + d]);
        }
        for (int j = 0; j <= i; ++j) {
          double pj = p[j] / l, dp = 0;
          for (int d = 0; d < D; ++d) dp += f64(dout[qa(b, i, h) + d]) * f64(v[ka(b, j, g) + d]);
          double ds = pj * (dp - delta_r);
          for (int d = 0; d < D; ++d) {
            rdq[qa(b, i, h) + d] += scale * ds * f64(k[ka(b, j, g) + d]);
            rdk[ka(b, j, g) + d] += scale * ds * f64(q[qa(b, i, h) + d]);
            rdv[ka(b, j, g) + d] += pj * f64(dout[qa(b, i, h) + d]);
          }
        }
      }
  auto near = [](const std::vector<bf16>& got, const std::vector<double>& want, const char* what) {
    double scale_ = 0;
    for (double w : want) scale_ = std::max(scale_, std::fabs(w));
    for (size_t i = 0; i < got.size(); ++i)
      CHECK(std::fabs(f64(got[i]) - want[i]) <= 1e-2 * std::fabs(want[i]) + 5e-3 * std::max(1.0, scale_),
            "%s[%zu] %f vs %f", what, i, f64(got[i]), want[i]);
  };
  near(dq, rdq, "dq");
  near(dk, rdk, "dk");
  near(dv, rdv, "dv");
  printf("case attn B%d T%d H%d Hkv%d D%d: %s\n", B, T, H, Hkv, D, g_fail > fail0 ? "FAIL" : "ok");
}

// Embedding gather, and the backward from a token-sorted plan built as the host builds it.
void embedding_case(int V, int C, int rows) {
  const int fail0 = g_fail;
  auto table = rand_bf16((size_t)V * C), dout = rand_bf16((size_t)rows * C), dtable = rand_bf16((size_t)V * C);
  const auto dtable0 = dtable;
  std::vector<int> ids(rows);
  for (int r = 0; r < rows; ++r) ids[r] = (r * 7 + r / 5) % V;  // repeats when rows > V
  std::vector<bf16> out((size_t)rows * C);
  launch({(unsigned)rows}, 128, embedding_fwd, table.data(), ids.data(), rows, C, out.data());
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < C; ++j) CHECK(out[(size_t)r * C + j].x == table[(size_t)ids[r] * C + j].x, "gather r%d j%d", r, j);
  std::vector<int> order(rows);
  for (int r = 0; r < rows; ++r) order[r] = r;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return ids[a] < ids[b]; });
  std::vector<int> starts, tokens;
  for (int p = 0; p < rows; ++p)
    if (p == 0 || ids[order[p]] != ids[order[p - 1]]) {
      starts.push_back(p);
      tokens.push_back(ids[order[p]]);
    }
  const int U = (int)tokens.size();
  starts.push_back(rows);
  launch({(unsigned)U}, 128, embedding_bwd, dout.data(), order.data(), starts.data(), tokens.data(), U, C, dtable.data());
  std::vector<double> want(dtable0.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = f64(dtable0[i]);
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < C; ++j) want[(size_t)ids[r] * C + j] += f64(dout[(size_t)r * C + j]);
  for (size_t i = 0; i < want.size(); ++i)
    CHECK(std::fabs(f64(dtable[i]) - want[i]) <= 1e-2 * std::fabs(want[i]) + 1e-2, "dtable[%zu] %f vs %f", i, f64(dtable[i]), want[i]);
  printf("case embedding V%d C%d rows%d (%d distinct): %s\n", V, C, rows, U, g_fail > fail0 ? "FAIL" : "ok");
}

int main() {
  rope_case(1, 1, 1, 2, 0);
  rope_case(14, 7, 3, 8, 0);
  rope_case(10, 5, 2, 64, 3);
  attn_case(1, 1, 1, 1, 2);
  attn_case(2, 5, 2, 1, 6);
  attn_case(1, 37, 4, 2, 8);
  attn_case(2, 70, 3, 3, 16);
  attn_case(1, 33, 2, 1, 64);
  embedding_case(5, 3, 1);
  embedding_case(11, 70, 40);
  embedding_case(300, 129, 17);
  return g_fail ? 1 : 0;
}
