"""Error bounds for the suite's numerical comparisons, derived from the computation compared.

Why derived: two correct implementations of the same formula differ because they round
differently -- another summation order (BLAS/oneDNN blocking, SIMD width 8 vs 16, 1 vs 2
threads, DDP all-reduce order), another exp/log, another rounding of an operand to bf16. How far
apart they may be follows from the computation, and is scaled by the magnitude of what is
summed, not by the result (a sum that cancels to ~0 may still carry the error of its big terms).
A tolerance fitted to one CPU's rounding fails on the next CPU; these do not.

The model (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sections 2-4):
  * each floating-point operation rounds with relative error <= u, the unit roundoff:
    fp64 2^-53, fp32 2^-24, fp16 2^-11, bf16 2^-8;
  * a sum of n terms computed in ANY order (pairwise, blocked, split across threads, reduced
    across ranks) has |error| <= gamma(n-1) * sum|t_i|, gamma(n) = n u / (1 - n u)  (eq. 4.4);
    so two such sums differ by <= 2 gamma(n) sum|t_i|;
  * a dot product / matmul entry with k products: |error| <= gamma(k) * (|A| |B|)_ij  (eq. 3.5),
    two of them differ by <= 2 gamma(k) (|A||B|)_ij;
  * a transcendental evaluated by any backend here is within EXP_ULPS ulps (the loosest one in
    use: at::vec's exp_u20, documented as max 20 ulp; Sleef u10 is 1 ulp, CUDA ex2.approx 2 ulp);
  * rounding a value to a narrower dtype once costs u_dtype * |value|.
These are worst cases; real errors are usually ~sqrt(n) smaller, so the bounds never flake, and a
wrong formula (an error of the size of a term, not of u times the terms) still fails them.
"""

from __future__ import annotations

import torch

U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
EXP_ULPS = 20  # the worst transcendental any backend uses: at::vec exp_u20 (max 20 ulp)


def unit_roundoff(dtype: torch.dtype) -> float:
    return U[dtype]


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n chained roundings."""
    nu = n * U[dtype]
    assert nu < 0.5, f"gamma({n}) for {dtype}: n u = {nu} is too big for a first-order bound"
    return nu / (1 - nu)


def sum_bound(abs_sum, n: int, dtype: torch.dtype = torch.float32):
    """How far two evaluations of the same n-term sum, in any two orders, can differ: each is
    within gamma(n-1) sum|t| of the exact sum. `abs_sum` is sum|t_i| (a tensor or a number)."""
    return 2 * gamma(max(n, 1), dtype) * abs_sum


def matmul_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How far two evaluations of a @ b (any blocking, any accumulation order) can differ,
    element by element: 2 gamma(k) (|a| |b|), computed in fp64."""
    k = a.shape[-1]
    return sum_bound(a.double().abs() @ b.double().abs(), k, dtype)


def rounding(x, dtype: torch.dtype):
    """The error of rounding x once to dtype: u_dtype |x|."""
    return U[dtype] * (x.double().abs() if isinstance(x, torch.Tensor) else abs(x))


def fn_error(x, dtype: torch.dtype = torch.float32):
    """The error of one transcendental (exp, log, ...) whose result is x: EXP_ULPS ulps, and one
    ulp of x is at most 2 u |x| (u |x| <= ulp(x)/2 only bounds the rounding to nearest)."""
    return 2 * EXP_ULPS * rounding(x, dtype)


_FN = 2 * EXP_ULPS * U[torch.float32]  # one exp/log in fp32 (fn_error's relative size)


def logp_error(z: torch.Tensor) -> torch.Tensor:
    """Bound [..., V] on the error of one fp32 evaluation of log_softmax(z)[j], for every j, from
    the fp32 logits z (any backend: torch's log_softmax, the fused online kernels).
    Per row, with m = max z, d_j = z_j - m, S = sum_j exp(d_j), L = log S:
      * d_j is rounded (u |d_j|), which exp turns into a relative error u |d_j| <= u max|d|;
        exp itself: F = 2 EXP_ULPS u (EXP_ULPS ulps, one ulp <= 2u|x|); an online (blocked)
        log-sum-exp rescales a partial sum once more: one more exp and one multiply, F + u;
      * S is a sum of V positive terms in any order: gamma(V) S.
      So S has relative error rho = u max|d| + 2 F + u + gamma(V), i.e. log S is off
      by rho / (1 - rho); log itself costs F |L|; lse = m + L rounds: u (|m| + |L|);
      log p_j = d_j - L (or z_j - lse) rounds: u (|d_j| + |log p_j|).
    Computed in fp64 from the actual logits."""
    z = z.detach().double()
    m = z.max(-1, keepdim=True).values
    d = z - m
    big_l = d.exp().sum(-1, keepdim=True).log()
    rho = U[torch.float32] * d.abs().amax(-1, keepdim=True) + 2 * _FN + U[torch.float32] + gamma(z.shape[-1])
    lse_err = rho / (1 - rho) + _FN * big_l.abs() + U[torch.float32] * (m.abs() + big_l.abs())
    return lse_err + U[torch.float32] * (d.abs() + (d - big_l).abs())


def f64(x) -> torch.Tensor:
    """x as an fp64 CPU tensor; a Python float stays a double (torch.as_tensor would round it
    to the default fp32 dtype)."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu()
    return torch.as_tensor(x, dtype=torch.float64)


def assert_within(actual, expected, bound, what: str = "") -> None:
    """|actual - expected| <= bound element by element (bound broadcasts; NaN/inf must match
    exactly). On failure names the worst element and how far over its bound it is."""
    a, e, b = (f64(x) for x in (actual, expected, bound))
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    b = b.expand_as(a) if b.dim() else b.expand(a.shape)
    assert (b >= 0).all() and not b.isnan().any(), f"{what}: the bound itself is negative or NaN"
    special = ~(a.isfinite() & e.isfinite())
    same_special = (a == e) | (a.isnan() & e.isnan())
    if (special & ~same_special).any():
        i = (special & ~same_special).nonzero()[0].tolist()
        raise AssertionError(f"{what}: non-finite mismatch at {i}: {a[tuple(i)].item()} vs {e[tuple(i)].item()}")
    diff = torch.where(special, torch.zeros_like(a), (a - e).abs())
    over = diff > b
    if over.any():
        ratio = torch.where(b > 0, diff / b, torch.where(diff > 0, torch.full_like(diff, float("inf")), diff))
        i = int(ratio.argmax())
        idx = list(torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else []
        idx = tuple(int(t) for t in idx)
        raise AssertionError(
            f"{what}: {int(over.sum())} of {a.numel()} elements exceed their derived bound; worst at {list(idx)}: "
            f"{a[idx].item()!r} vs {e[idx].item()!r}, |diff| {diff[idx].item():.3g} = "
            f"{ratio[idx].item():.3g} x bound {b[idx].item():.3g}")
