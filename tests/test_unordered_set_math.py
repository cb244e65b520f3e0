"""Brute-force checks of the unordered set estimator's numerical core (Kool et al. 2020).

References are computed independently in plain Python floats: the probability of an ordered
sample without replacement is ``prod_i p(b_i) / sum_{j not yet drawn} p(j)`` (the complement
is summed directly, so there is no cancellation even at probabilities near 1), and the
probability of an unordered set is the sum over its orderings. The estimator identities are
checked exactly by summing over every set ``S`` with its probability.
"""

import itertools
import math

import pytest
import torch

from storch_pyro.estimators._unordered_set_math import (
    EXACT_MAX_K,
    default_num_points,
    gumbel_top_k,
    log_leave_one_out_ratios,
    log_leave_one_out_set_probabilities,
    log_leave_two_out_set_probabilities,
    log_set_probability,
    unordered_set_weights,
)

Z_BOUND = 4.5
METHODS = ["exact", "quadrature"]

# Logits of length 6 (the first n are used): moderate, extreme (+-20), probabilities ~1e-8,
# uniform.
CASES = {
    "random": [0.3, -1.2, 2.0, 0.7, -0.4, 1.1],
    "extreme": [20.0, -20.0, 0.0, 5.0, -5.0, 12.0],
    "tiny": [math.log(x) for x in (1e-8, 2e-8, 0.3, 0.5, 0.2 - 4e-8, 1e-8)],
    "uniform": [0.0] * 6,
}
SIZES = [(n, k) for n in range(2, 7) for k in range(1, min(4, n) + 1)]


def _ordered_prob(p, order):
    """Probability of drawing ``order`` (distinct indices) in this order without replacement;
    ``p`` may be unnormalised (or contain zeros for removed categories)."""
    remaining = set(range(len(p)))
    out = 1.0
    for b in order:
        out *= p[b] / math.fsum(p[i] for i in remaining if p[i] > 0)
        remaining.remove(b)
    return out


def _set_prob(p, subset):
    return math.fsum(_ordered_prob(p, order) for order in itertools.permutations(subset))


def _without(p, removed):
    return [0.0 if i in removed else x for i, x in enumerate(p)]


def _probs(case, n):
    return torch.softmax(torch.tensor(CASES[case][:n], dtype=torch.float64), 0).tolist()


def _all_sets(n, k):
    return list(itertools.combinations(range(n), k))


def _batch(case, n, k, dtype=torch.float64):
    """All k-sets of range(n) as one batch: (log_p [C, n], indices [C, k], p list, sets)."""
    sets = _all_sets(n, k)
    log_p = torch.log_softmax(torch.tensor(CASES[case][:n], dtype=dtype), 0)
    return log_p.expand(len(sets), n), torch.tensor(sets), _probs(case, n), sets


def _rel_err(log_value, ref):
    ref = torch.as_tensor(ref, dtype=torch.float64)
    return ((log_value.double().exp() - ref).abs() / ref).max().item()


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_gumbel_top_k_shapes_distinct_sorted():
    logits = torch.randn(3, 5, 7)
    idx, perturbed = gumbel_top_k(logits, 4)
    assert idx.shape == perturbed.shape == (3, 5, 4)
    assert idx.dtype == torch.long and perturbed.dtype == logits.dtype
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
    assert (perturbed.diff(dim=-1) <= 0).all()
    gen = torch.Generator().manual_seed(3)
    a = gumbel_top_k(logits, 2, generator=gen)
    gen.manual_seed(3)
    b = gumbel_top_k(logits, 2, generator=gen)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for bad_k in (0, 8):
        with pytest.raises(ValueError):
            gumbel_top_k(logits, bad_k)
    # Impossible categories are never drawn while k possible ones remain.
    masked = torch.tensor([0.0, float("-inf"), 1.0, -2.0]).expand(1000, 4)
    idx, _ = gumbel_top_k(masked, 3)
    assert not (idx == 1).any()


def test_gumbel_top_k_ordered_sample_frequencies():
    """All 24 ordered outcomes of k=3 from n=4: frequencies within 4.5 standard errors."""
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0], dtype=torch.float64)
    p = torch.softmax(logits, 0).tolist()
    draws = 20000
    gen = torch.Generator().manual_seed(0)
    idx, _ = gumbel_top_k(logits.expand(draws, 4), 3, generator=gen)
    keys = idx[:, 0] * 16 + idx[:, 1] * 4 + idx[:, 2]
    counts = torch.bincount(keys, minlength=64)
    total = 0.0
    for order in itertools.permutations(range(4), 3):
        prob = _ordered_prob(p, order)
        total += prob
        freq = counts[order[0] * 16 + order[1] * 4 + order[2]].item() / draws
        se = math.sqrt(prob * (1 - prob) / draws)
        assert abs(freq - prob) < Z_BOUND * se, (order, freq, prob)
    assert abs(total - 1) < 1e-12


# --------------------------------------------------------------------------------------------
# Set probabilities against enumeration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_set_probabilities_match_enumeration(method, case, dtype):
    tol = 1e-10 if dtype == torch.float64 else 5e-5
    for n, k in SIZES:
        log_p, idx, p, sets = _batch(case, n, k, dtype)
        full = log_set_probability(log_p, idx, method=method)
        loo = log_leave_one_out_set_probabilities(log_p, idx, method=method)
        lto = log_leave_two_out_set_probabilities(log_p, idx, method=method)
        assert full.dtype == loo.dtype == lto.dtype == dtype
        assert full.shape == (len(sets),) and loo.shape == (len(sets), k)
        assert lto.shape == (len(sets), k, k)
        ref = [_set_prob(p, S) for S in sets]
        ref_loo = [[_set_prob(_without(p, {s}), [t for t in S if t != s]) for s in S] for S in sets]
        ref_lto = [
            [
                [_set_prob(_without(p, {s, t}), [u for u in S if u not in (s, t)]) for t in S]
                for s in S
            ]
            for S in sets
        ]
        assert _rel_err(full, ref) < tol, (n, k)
        assert _rel_err(loo, ref_loo) < tol, (n, k)
        assert _rel_err(lto, ref_lto) < tol, (n, k)
        assert abs(full.double().exp().sum().item() - 1) < tol * 10


def test_set_probability_is_invariant_to_normalisation_and_broadcasts():
    logits = torch.randn(5, 6, dtype=torch.float64) * 3
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(5)])
    for method in METHODS:
        a = log_set_probability(logits, idx, method=method)
        b = log_set_probability(torch.log_softmax(logits, -1) - 7.0, idx, method=method)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        # log_p [n] broadcast against indices [5, k], and batched == one by one.
        c = log_set_probability(logits[0], idx, method=method)
        one = torch.stack([log_set_probability(logits[0], idx[i], method=method) for i in range(5)])
        assert c.shape == (5,)
        torch.testing.assert_close(c, one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [5, 8, EXACT_MAX_K])
def test_quadrature_matches_exact_for_larger_k(k):
    gen = torch.Generator().manual_seed(k)
    scales = torch.tensor([0.1, 1.0, 4.0, 12.0], dtype=torch.float64)[:, None, None]
    logits = torch.randn(4, 3, k + 3, generator=gen, dtype=torch.float64) * scales
    idx = torch.argsort(torch.rand(4, 3, k + 3, generator=gen), -1)[..., :k]
    full_e, loo_e, lto_e = (
        f(logits, idx, method="exact")
        for f in (
            log_set_probability,
            log_leave_one_out_set_probabilities,
            log_leave_two_out_set_probabilities,
        )
    )
    full_q = log_set_probability(logits, idx, method="quadrature")
    loo_q = log_leave_one_out_set_probabilities(logits, idx, method="quadrature")
    lto_q = log_leave_two_out_set_probabilities(logits, idx, method="quadrature")
    for q, e in ((full_q, full_e), (loo_q, loo_e), (lto_q, lto_e)):
        assert (q - e).abs().max().item() < 1e-11  # relative error of the probabilities
    # 40 % fewer nodes than the default: still accurate to ~1e-6.
    coarse = log_set_probability(
        logits, idx, method="quadrature", num_points=int(0.6 * default_num_points(k))
    )
    assert (coarse - full_e).abs().max().item() < 1e-5


def test_ratios_and_gradients():
    logits = torch.tensor([0.2, -0.7, 1.3, 0.1, -2.0], dtype=torch.float64)
    idx = torch.tensor([[0, 2, 3], [4, 1, 2]])
    for method in METHODS:
        log_r, log_r2 = log_leave_one_out_ratios(logits, idx, method=method)
        full = log_set_probability(logits, idx, method=method)
        loo = log_leave_one_out_set_probabilities(logits, idx, method=method)
        lto = log_leave_two_out_set_probabilities(logits, idx, method=method)
        torch.testing.assert_close(log_r, loo - full[:, None])
        torch.testing.assert_close(log_r2, lto - loo[:, :, None])
        assert log_r2.diagonal(dim1=-2, dim2=-1).abs().max() == 0

        def f(x, method=method):
            return (
                log_set_probability(x, idx, method=method),
                log_leave_two_out_set_probabilities(x, idx, method=method),
            )

        assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(),))


# --------------------------------------------------------------------------------------------
# Estimator identities, exact over all sets
# --------------------------------------------------------------------------------------------


def _weights_all_sets(case, n, k, method):
    log_p, idx, p, sets = _batch(case, n, k)
    w, w_bl = unordered_set_weights(log_p, idx, method=method)
    p_set = torch.tensor([_set_prob(p, S) for S in sets], dtype=torch.float64)
    return idx, torch.tensor(p, dtype=torch.float64), p_set, w, w_bl


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_value_estimator_is_unbiased(method, case):
    """E_S[sum_s w_s f(s)] = sum_i p_i f(i) for arbitrary f; weights and baseline rows sum to 1;
    the baseline B_s is itself unbiased for E_p[f] given that s was drawn first."""
    gen = torch.Generator().manual_seed(1)
    for n, k in SIZES:
        idx, p, p_set, w, w_bl = _weights_all_sets(case, n, k, method)
        assert w.shape == (len(p_set), k) and w_bl.shape == (len(p_set), k, k)
        f = torch.randn(3, n, generator=gen, dtype=torch.float64)  # three arbitrary f's
        f_set = f[:, idx]  # [3, C, k]
        estimate = (p_set * (w * f_set).sum(-1)).sum(-1)
        torch.testing.assert_close(estimate, f @ p, rtol=0, atol=1e-9)
        torch.testing.assert_close(w.sum(-1), torch.ones_like(p_set), rtol=0, atol=1e-10)
        if k >= 2:
            torch.testing.assert_close(w_bl.sum(-1), torch.ones_like(w), rtol=0, atol=1e-10)
            # E_S[sum_s w_s B_s] = E_p[f]: the baseline term has the right expectation.
            b = (w_bl[None] * f_set[:, :, None, :]).sum(-1)  # [3, C, k]
            torch.testing.assert_close((p_set * (w * b).sum(-1)).sum(-1), f @ p, rtol=0, atol=1e-9)


def _expected_gradient(case, n, k, method, f, use_baseline=True, diag=True):
    """Exact E_S of sum_s w_s (f(s) - B_s) grad log p(s), weights detached, by autograd."""
    theta = torch.tensor(CASES[case][:n], dtype=torch.float64, requires_grad=True)
    sets = _all_sets(n, k)
    idx = torch.tensor(sets)
    log_p = torch.log_softmax(theta, 0).expand(len(sets), n)
    w, w_bl = unordered_set_weights(log_p, idx, method=method)
    assert not w.requires_grad and not w_bl.requires_grad
    if not diag:
        w_bl = w_bl * (1 - torch.eye(k, dtype=w_bl.dtype))
    f_set = f[idx]
    advantage = f_set - (w_bl * f_set[:, None, :]).sum(-1) if use_baseline else f_set
    p_set = torch.tensor([_set_prob(_probs(case, n), S) for S in sets], dtype=torch.float64)
    surrogate = (p_set * (w * advantage * log_p.gather(-1, idx)).sum(-1)).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    theta_exact = theta.detach().clone().requires_grad_()
    (true,) = torch.autograd.grad(torch.softmax(theta_exact, 0) @ f, theta_exact)
    return grad, true


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_estimator_with_builtin_baseline_is_unbiased(method, case):
    gen = torch.Generator().manual_seed(2)
    for n, k in SIZES:
        f = torch.randn(n, generator=gen, dtype=torch.float64) * 3
        for use_baseline in (True, False):
            grad, true = _expected_gradient(case, n, k, method, f, use_baseline)
            torch.testing.assert_close(grad, true, rtol=0, atol=1e-9)


def test_baseline_without_its_diagonal_term_is_biased():
    f = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    grad, true = _expected_gradient("random", 4, 2, "exact", f, diag=False)
    assert (grad - true).abs().max() > 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_k_equals_n_gives_the_exact_expectation(method):
    """S = D: R = 1, weights are p(s), every baseline is E_p[f], the estimate is exact."""
    logits = torch.tensor([[2.0, -1.0, 0.3, 20.0], [0.0, 0.0, -20.0, 1.0]], dtype=torch.float64)
    idx = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]])
    p = torch.softmax(logits, -1).gather(-1, idx)
    w, w_bl = unordered_set_weights(logits, idx, method=method)
    torch.testing.assert_close(w, p, rtol=1e-13, atol=0)
    torch.testing.assert_close(w_bl, p[:, None, :].expand(2, 4, 4), rtol=1e-13, atol=0)
    assert log_set_probability(logits, idx, method=method).abs().max() < 1e-13
    grad, true = _expected_gradient("extreme", 4, 4, method, torch.randn(4, dtype=torch.float64))
    torch.testing.assert_close(grad, true, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_k_equals_one_is_reinforce(method):
    logits = torch.randn(3, 5, dtype=torch.float64)
    idx, _ = gumbel_top_k(logits, 1)
    w, w_bl = unordered_set_weights(logits, idx, method=method)
    torch.testing.assert_close(w, torch.ones(3, 1, dtype=torch.float64), rtol=1e-12, atol=0)
    assert w_bl.shape == (3, 1, 1) and (w_bl == 0).all()
    lp = log_set_probability(logits, idx, method=method)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, idx)[:, 0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_batch_shapes_dtype_and_detached(method, dtype):
    logits = (torch.randn(2, 3, 7) * 4).to(dtype).requires_grad_()
    idx, _ = gumbel_top_k(logits.detach(), 4)
    w, w_bl = unordered_set_weights(logits, idx, method=method)
    assert w.shape == (2, 3, 4) and w_bl.shape == (2, 3, 4, 4)
    assert w.dtype == w_bl.dtype == dtype and not w.requires_grad and not w_bl.requires_grad
    assert torch.isfinite(w).all() and torch.isfinite(w_bl).all()
    one = unordered_set_weights(logits[1, 2], idx[1, 2], method=method)
    torch.testing.assert_close(w[1, 2], one[0])
    torch.testing.assert_close(w_bl[1, 2], one[1])
    with pytest.raises(ValueError):
        unordered_set_weights(logits, idx, method="nope")
