#!/usr/bin/env python3
"""Reference values for the tests of src/eval/stats.rs, from scipy, statsmodels and numpy.

Run: python3 scripts/stats_reference.py (needs `pip install scipy statsmodels numpy`). It prints
the values the Rust tests paste in, with the library versions that made them.
"""
import numpy as np
import scipy
import statsmodels
from scipy import special, stats
from statsmodels.stats.contingency_tables import mcnemar

print(f"# numpy {np.__version__}, scipy {scipy.__version__}, statsmodels {statsmodels.__version__}")

print("\n# McNemar: (b, c, exact p, chi2 with continuity correction, chi2 p)")
for b, c in [(0, 0), (1, 0), (5, 1), (10, 3), (25, 40), (100, 130), (3, 3), (0, 7), (1000, 1100)]:
    table = [[0, b], [c, 0]]  # only the discordant cells matter
    exact = mcnemar(table, exact=True).pvalue
    if b + c == 0:
        chi2, chi2_p = 0.0, 1.0  # statsmodels divides by zero here; the Rust convention
    else:
        r = mcnemar(table, exact=False, correction=True)
        chi2, chi2_p = r.statistic, r.pvalue
        # The same p from scipy's chi-square survival function, and the exact p from binomtest.
        assert abs(stats.chi2.sf(chi2, 1) - chi2_p) <= 1e-15 + 1e-12 * chi2_p
        assert abs(stats.binomtest(min(b, c), b + c, 0.5).pvalue - exact) <= 1e-12 * exact
    print(f"({b}, {c}, {float(exact)!r}, {float(chi2)!r}, {float(chi2_p)!r}),")

print("\n# Binomial tail P(X <= k), X ~ Bin(n, 1/2): (k, n, value)")
for k, n in [(0, 1), (3, 10), (30, 100), (700, 2000), (2400, 5000)]:
    print(f"({k}, {n}, {float(stats.binom.cdf(k, n, 0.5))!r}),")

print("\n# erfc: (x, erfc(x))")
for x in [-2.0, -0.5, 0.0, 1e-3, 0.1, 0.5, 1.0, 1.2247, 1.3, 2.0, 3.0, 5.0, 10.0, 26.0]:
    print(f"({x!r}, {float(special.erfc(x))!r}),")

print("\n# np.percentile (linear) of QUANTILE_DATA at (q, value)")
data = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
for q in [0.0, 2.5, 25.0, 50.0, 97.5, 100.0]:
    print(f"({q / 100!r}, {float(np.percentile(data, q))!r}),")

print("\n# Bootstrap of a pooled accuracy over explicit resamples")
clusters = [(5, 5), (4, 5), (3, 5), (5, 5), (2, 5), (0, 5), (4, 5), (1, 5)]  # (right, questions)
rng = np.random.default_rng(2024)
resamples = [rng.integers(0, len(clusters), len(clusters)).tolist() for _ in range(12)]
print("RESAMPLES =", resamples)
acc = lambda idx: sum(clusters[i][0] for i in idx) / sum(clusters[i][1] for i in idx)
values = [acc(r) for r in resamples]
print("values =", values)
print("estimate =", repr(acc(range(len(clusters)))))
print("lo, hi =", [float(v) for v in np.percentile(values, [2.5, 97.5])])
