// Emulated check of kernels/llm_decode.cu against double-precision references (run by
// tests/kernels_emulated.rs; see emu.h for what the emulation does and does not catch).
#include "llm_decode.emu.h"

static std::vector<int> rand_ints(size_t n, int below) {
  std::uniform_int_distribution<int> d(0, below - 1);
  std::vector<int> v(n);
  for (auto& x : v) x = d(emu_rng);
  return v;
}

// RoPE at explicit positions against the rotation in double.
void rope_at_case(int rows, int heads, int D, int max_pos) {
  const int fail0 = g_fail;
  const int half = D / 2;
  std::vector<float> cs, sn;
  rope_tables(max_pos, D, cs, sn);
  auto pos = rand_ints(rows, max_pos);
  auto x = rand_bf16((size_t)rows * heads * D, -2, 2);
  const auto x0 = x;
  unsigned blocks = (unsigned)(((long long)rows * heads * half + 255) / 256);
  launch({blocks}, 256, rope_pairs_at, x.data(), cs.data(), sn.data(), pos.data(), rows, heads, D);
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < half; ++i) {
        size_t at = ((size_t)r * heads + h) * D + 2 * i, t = (size_t)pos[r] * half + i;
        double a = f64(x0[at]), b = f64(x0[at + 1]);
        double w0 = a * cs[t] - b * sn[t], w1 = a * sn[t] + b * cs[t];
        CHECK(std::fabs(f64(x[at]) - w0) <= 1e-2 * std::fabs(w0) + 1e-3, "rope_at r%d h%d i%d %f vs %f", r, h, i, f64(x[at]), w0);
        CHECK(std::fabs(f64(x[at + 1]) - w1) <= 1e-2 * std::fabs(w1) + 1e-3, "rope_at r%d h%d i%d (odd)", r, h, i);
      }
  printf("case rope_at rows%d heads%d D%d max_pos%d: %s\n", rows, heads, D, max_pos, g_fail > fail0 ? "FAIL" : "ok");
}

// The append writes exactly its rows, bit for bit, and leaves every other slot alone.
void append_case(int S, int slots, int W, int rows) {
  const int fail0 = g_fail;
  auto src = rand_bf16((size_t)rows * W);
  auto cache = rand_bf16((size_t)S * slots * W);
  const auto before = cache;
  // Distinct (seq, slot) targets: a random permutation's first `rows` cells.
  std::vector<int> cells(S * slots);
  for (int i = 0; i < S * slots; ++i) cells[i] = i;
  std::shuffle(cells.begin(), cells.end(), emu_rng);
  std::vector<int> seq(rows), pos(rows);
  std::vector<int> writer(S * slots, -1);
  for (int r = 0; r < rows; ++r) {
    seq[r] = cells[r] / slots;
    pos[r] = cells[r] % slots;
    writer[cells[r]] = r;
  }
  launch({(unsigned)rows}, 128, kv_append, src.data(), seq.data(), pos.data(), rows, W, slots, cache.data());
  for (int c = 0; c < S * slots; ++c)
    for (int j = 0; j < W; ++j) {
      uint16_t got = cache[(size_t)c * W + j].x;
      uint16_t want = writer[c] >= 0 ? src[(size_t)writer[c] * W + j].x : before[(size_t)c * W + j].x;
      CHECK(got == want, "kv_append cell %d col %d", c, j);
    }
  printf("case kv_append S%d slots%d W%d rows%d: %s\n", S, slots, W, rows, g_fail > fail0 ? "FAIL" : "ok");
}

void check_decode(const std::vector<bf16>& q, const std::vector<bf16>& kc, const std::vector<bf16>& vc,
                  const std::vector<int>& seq, const std::vector<int>& pos, int slots, int H, int Hkv, int D,
                  const std::vector<bf16>& out, const char* variant);

// Decode attention: N queries of random sequences at chosen positions (tile edges included)
// against the softmax in double over keys 0..=pos.
void decode_case(int S, int slots, int H, int Hkv, int D, std::vector<int> pos) {
  const int fail0 = g_fail;
  const int N = (int)pos.size();
  auto seq = rand_ints(N, S);
  auto q = rand_bf16((size_t)N * H * D, -2, 2);
  auto kc = rand_bf16((size_t)S * slots * Hkv * D, -2, 2), vc = rand_bf16((size_t)S * slots * Hkv * D);
  std::vector<bf16> out((size_t)N * H * D);
  const float scale = 1.0f / std::sqrt((float)D);
  launch({(unsigned)H, (unsigned)N}, 128, decode_attn, q.data(), kc.data(), vc.data(), seq.data(), pos.data(), N, slots, H,
         Hkv, D, scale, out.data());
  check_decode(q, kc, vc, seq, pos, slots, H, Hkv, D, out, "v1");
  // Variant 2 at chunks of 128 and 256 positions (one chunk, or several with empty ones past a
  // short query's length).
  for (int chunk : {128, 256}) {
    const int splits = (slots + chunk - 1) / chunk;
    std::vector<float> part_o((size_t)N * H * splits * D, -9.f), part_ml((size_t)N * H * splits * 2, -9.f);
    std::vector<bf16> out2((size_t)N * H * D);
    launch({(unsigned)H, (unsigned)N, (unsigned)splits}, 128, decode_attn_split, q.data(), kc.data(), vc.data(), seq.data(),
           pos.data(), N, slots, H, Hkv, D, scale, chunk, part_o.data(), part_ml.data());
    launch({(unsigned)H, (unsigned)N}, 128, decode_attn_combine, part_o.data(), part_ml.data(), N, H, D, splits, out2.data());
    check_decode(q, kc, vc, seq, pos, slots, H, Hkv, D, out2, chunk == 128 ? "v2/128" : "v2/256");
  }
  printf("case decode S%d slots%d H%d Hkv%d D%d N%d: %s\n", S, slots, H, Hkv, D, N, g_fail > fail0 ? "FAIL" : "ok");
}

// The softmax over keys 0..=pos in double against `out`.
void check_decode(const std::vector<bf16>& q, const std::vector<bf16>& kc, const std::vector<bf16>& vc,
                  const std::vector<int>& seq, const std::vector<int>& pos, int slots, int H, int Hkv, int D,
                  const std::vector<bf16>& out, const char* variant) {
  const int N = (int)pos.size(), group = H / Hkv;
  const float scale = 1.0f / std::sqrt((float)D);
  for (int n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h) {
      const int g = h / group, len = pos[n] + 1;
      auto key = [&](int j) { return (((size_t)seq[n] * slots + j) * Hkv + g) * D; };
      std::vector<double> s(len);
      double m = -INFINITY, l = 0;
      for (int j = 0; j < len; ++j) {
        double acc = 0;
        for (int d = 0; d < D; ++d) acc += f64(q[((size_t)n * H + h) * D + d]) * f64(kc[key(j) + d]);
        s[j] = acc * scale;
        m = std::max(m, s[j]);
      }
      for (int j = 0; j < len; ++j) l += s[j] = std::exp(s[j] - m);
      for (int d = 0; d < D; ++d) {
        double want = 0;
        for (int j = 0; j < len; ++j) want += s[j] / l * f64(vc[key(j) + d]);
        double got = f64(out[((size_t)n * H + h) * D + d]);
        CHECK(std::fabs(got - want) < 1e-2 * std::fabs(want) + 2e-3, "decode %s n%d (seq %d pos %d) h%d d%d %f vs %f",
              variant, n, seq[n], pos[n], h, d, got, want);
      }
    }
}

int main() {
  rope_at_case(1, 1, 2, 1);
  rope_at_case(9, 3, 8, 40);
  rope_at_case(5, 2, 64, 300);
  append_case(1, 1, 2, 1);
  append_case(3, 7, 24, 10);
  append_case(2, 50, 130, 33);
  decode_case(1, 1, 1, 1, 2, {0});
  decode_case(2, 40, 4, 2, 8, {0, 1, 31, 32, 39});
  decode_case(3, 300, 3, 1, 64, {127, 128, 129, 255, 299});
  decode_case(1, 20, 2, 2, 256, {19, 5});
  decode_case(2, 70, 6, 3, 6, {64, 33, 0});
  decode_case(1, 600, 2, 1, 16, {5, 599, 300});
  return g_fail ? 1 : 0;
}
