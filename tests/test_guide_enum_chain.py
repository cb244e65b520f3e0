"""Enumerate at a guide's sites along ``pyro.markov`` (ELBO mode): recycled dims, the belief
kept per site and the model's costs weighted when the model replays the guide's values
(:meth:`storch_pyro.contraction.Chain.replay`); exact against TraceEnum_ELBO and the forward
algorithm, linear in the length of the chain."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

import storch_pyro as storch
from storch_pyro import estimators
from storch_pyro.errors import StorchError

K = 3


def _params(T, seed=0, extra=None):
    """Random float64 parameters (the HMM's, plus ``extra`` name -> shape) and T data."""
    generator = torch.Generator().manual_seed(seed)
    names = {"init": (K,), "trans": (K, K), "locs": (K,), "q0": (K,), "qtrans": (K, K),
             **(extra or {})}
    params = {name: torch.randn(shape, generator=generator, dtype=torch.float64)
              for name, shape in names.items()}
    for value in params.values():
        value.requires_grad_()
    return params, torch.randn(T, generator=generator, dtype=torch.float64)


def _model(p, data):
    z = pyro.sample("z_0", dist.Categorical(logits=p["init"]))
    pyro.sample("x_0", dist.Normal(p["locs"][z], 1.0), obs=data[0])
    for t in pyro.markov(range(1, len(data))):
        z = pyro.sample(f"z_{t}", dist.Categorical(logits=p["trans"][z]))
        pyro.sample(f"x_{t}", dist.Normal(p["locs"][z], 1.0), obs=data[t])


def _guide(p, data, ranks=None):
    z = pyro.sample("z_0", dist.Categorical(logits=p["q0"]))
    for t in pyro.markov(range(1, len(data))):
        z = pyro.sample(f"z_{t}", dist.Categorical(logits=p["qtrans"][z] + data[t]))
        if ranks is not None:
            ranks.append(z.dim())


def _forward_elbo(p, data):
    """The exact loss E_q[log q(z) - log p(x, z)] by the forward algorithm: the pairwise
    marginals q(z_{t-1}, z_t) = alpha_{t-1}(z_{t-1}) q(z_t | z_{t-1})."""
    log_lik = dist.Normal(p["locs"], 1.0).log_prob(data[:, None])  # (T, K)
    log_q0, log_p0 = p["q0"].log_softmax(-1), p["init"].log_softmax(-1)
    alpha = log_q0.exp()
    loss = (alpha * (log_q0 - log_p0 - log_lik[0])).sum()
    log_trans = p["trans"].log_softmax(-1)
    for t in range(1, len(data)):
        log_q = (p["qtrans"] + data[t]).log_softmax(-1)
        pair = alpha[:, None] * log_q.exp()
        alpha = pair.sum(0)
        loss = loss + (pair * (log_q - log_trans)).sum() - (alpha * log_lik[t]).sum()
    return loss


def _assert_close(got, want, params, tol=1e-5):
    assert abs(float(got.detach()) - float(want.detach())) < tol
    for g, w in zip(torch.autograd.grad(got, params, retain_graph=True),
                    torch.autograd.grad(want, params, retain_graph=True)):
        assert (g - w).abs().max() < tol


@pytest.mark.parametrize("credit", ["order", "data_flow"])
@pytest.mark.parametrize("T", [10, 100])
def test_guide_chain_is_exact(T, credit):
    p, data = _params(T)
    ranks = []
    elbo = storch.StorchELBO(max_plate_nesting=0, default_estimator=estimators.Enumerate(),
                             credit=credit)
    loss = elbo.differentiable_loss(_model, lambda *a: _guide(*a, ranks), p, data)
    params = list(p.values())
    _assert_close(loss, _forward_elbo(p, data), params)
    if T == 10:
        want = TraceEnum_ELBO(max_plate_nesting=0).differentiable_loss(
            _model, config_enumerate(_guide), p, data)
        _assert_close(loss, want, params)
    # Recycled dims: z_0's own dim and two alternating chain dims, whatever T.
    assert max(ranks) <= 3
    exact = float(_forward_elbo(p, data).detach())
    assert abs(elbo.loss(_model, _guide, p, data) - exact) < 1e-5


def test_second_order_chain_in_a_plate_equals_unrecycled_enumeration():
    """A guide chain of order 2 (``history=2``) in a plate of sequences, with a guide site
    drawn after the chain from its last value: equal to the same guide without
    ``pyro.markov`` (every site its own dim: exponential, exact)."""
    T, N = 6, 3
    generator = torch.Generator().manual_seed(3)
    W = torch.randn(N, K, K, K, dtype=torch.float64, generator=generator).requires_grad_()
    V = torch.randn(K, K, K, dtype=torch.float64, generator=generator).requires_grad_()
    locs = torch.randn(K, dtype=torch.float64, generator=generator).requires_grad_()
    data = torch.randn(T, N, dtype=torch.float64, generator=generator)

    def model():
        with pyro.plate("seqs", N, dim=-1):
            a = pyro.sample("z_0", dist.Categorical(logits=V[0, 0]))
            b = pyro.sample("z_1", dist.Categorical(logits=V[0, a]))
            for t in pyro.markov(range(2, T), history=2):
                a, b = b, pyro.sample(f"z_{t}", dist.Categorical(logits=V[a, b]))
                pyro.sample(f"x_{t}", dist.Normal(locs[a] - locs[b], 1.0), obs=data[t])
            pyro.sample("last", dist.Categorical(logits=V[b, a]))

    def guide(markov):
        def run():
            i = torch.arange(N)
            with pyro.plate("seqs", N, dim=-1):
                a = pyro.sample("z_0", dist.Categorical(logits=W[i, 0, 0]))
                b = pyro.sample("z_1", dist.Categorical(logits=W[i, 0, a]))
                steps = pyro.markov(range(2, T), history=2) if markov else range(2, T)
                for t in steps:
                    a, b = b, pyro.sample(f"z_{t}", dist.Categorical(logits=W[i, a, b]))
                pyro.sample("last", dist.Categorical(logits=W[i, b, b]))

        return run

    params = [W, V, locs]
    losses = []
    for markov in (True, False):
        elbo = storch.StorchELBO(max_plate_nesting=1, default_estimator=estimators.Enumerate())
        losses.append(elbo.differentiable_loss(model, guide(markov)))
    _assert_close(losses[0], losses[1], params, tol=1e-10)


@pytest.mark.parametrize("credit", ["order", "data_flow"])
def test_mixed_guide_chain_is_unbiased(credit):
    """In the guide, each step's enumerated ``z_t`` is followed by a ``y_t`` sampled by
    ScoreFunction per value of ``z_t`` (its score joins the belief), after a global ``s``
    (ScoreFunction) that every step's guide distribution reads. The mean gradient over
    4000 independent copies (a plate; per-copy parameters, so each copy's gradient is one
    draw) is within 4.5 s.e. of the exact one (TraceEnum_ELBO, every guide site
    enumerated) in every coordinate. Power: the measured s.e. is at most 0.043 per
    coordinate (gradients up to 2.4), so a bias above ~0.19 fails; the scores of the
    ``y_t`` left out of the belief (detached) fail at 144 s.e."""
    T, N = 4, 20000
    generator = torch.Generator().manual_seed(5)
    shapes = {"q0": (K,), "qtrans": (K, K), "qy": (K,), "qs": (), "init": (K,),
              "trans": (K, K), "py": (K,), "locs": (K,)}
    base = {name: torch.randn(shape, dtype=torch.float64, generator=generator)
            for name, shape in shapes.items()}
    data = torch.randn(T, dtype=torch.float64, generator=generator)

    def model(p, n):
        i = torch.arange(n)
        with pyro.plate("copies", n, dim=-1):
            s = pyro.sample("s", dist.Bernoulli(logits=torch.zeros(n, dtype=torch.float64)))
            z = None
            for t in pyro.markov(range(T)):
                logits = p["init"] if z is None else p["trans"][i, z]
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=logits))
                y = pyro.sample(f"y_{t}", dist.Bernoulli(logits=p["py"][i, z]))
                pyro.sample(f"x_{t}", dist.Normal(p["locs"][i, z] + y - s, 1.0), obs=data[t])

    def guide(p, n):
        i = torch.arange(n)
        with pyro.plate("copies", n, dim=-1):
            s = pyro.sample("s", dist.Bernoulli(logits=p["qs"]))
            z = None
            for t in pyro.markov(range(T)):
                logits = p["q0"] + s[..., None] if z is None else p["qtrans"][i, z]
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=logits))
                pyro.sample(f"y_{t}", dist.Bernoulli(logits=p["qy"][i, z] + data[t]))

    def copies(n):
        return {name: value.expand((n,) + value.shape).clone().requires_grad_()
                for name, value in base.items()}

    exact_params = copies(1)
    exact = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        model, config_enumerate(guide), exact_params, 1)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact, list(
        exact_params.values()))])

    params = copies(N)
    config = {f"z_{t}": estimators.Enumerate() for t in range(T)}
    with storch.handlers.estimator(config=config):
        elbo = storch.StorchELBO(max_plate_nesting=1, credit=credit)
        loss = elbo.differentiable_loss(model, guide, params, N)
    draws = torch.cat([g.reshape(N, -1) for g in torch.autograd.grad(loss, list(
        params.values()))], 1)
    mean, se = draws.mean(0), draws.std(0) / N ** 0.5
    assert se.max() < 0.05, se
    # Coordinates of zero variance (the model's parameters meet only exact sums) get a
    # round-off tolerance.
    assert ((mean - exact).abs() < 4.5 * se + 1e-9).all(), (mean, exact, se)


@pytest.mark.parametrize("credit", ["order", "data_flow"])
def test_alternating_guide_chain_is_unbiased(credit):
    """Guide steps alternate Enumerate and ScoreFunction along one chain (each sampled step
    drawn per value of the enumerated one before it, each enumerated step conditioned on
    the sample before it). The mean gradient over 20000 copies in a plate (per-copy
    parameters) is within 4.5 s.e. of TraceEnum_ELBO's exact one in every coordinate.
    Power: the measured s.e. is at most 0.06 per coordinate (gradients up to ~1.3), so a
    bias above ~0.27 fails. Also: the Hessian of the exact (all enumerated) loss equals
    TraceEnum_ELBO's (second order through the kept beliefs), and vectorized particles give
    the same exact loss."""
    T, N = 6, 20000
    generator = torch.Generator().manual_seed(7)
    shapes = {"q0": (K,), "qtrans": (K, K), "init": (K,), "trans": (K, K), "locs": (K,)}
    base = {name: torch.randn(shape, dtype=torch.float64, generator=generator)
            for name, shape in shapes.items()}
    data = torch.randn(T, dtype=torch.float64, generator=generator)

    def model(p, n):
        i = torch.arange(n)
        with pyro.plate("copies", n, dim=-1):
            z = None
            for t in pyro.markov(range(T)):
                logits = p["init"] if z is None else p["trans"][i, z]
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=logits))
                pyro.sample(f"x_{t}", dist.Normal(p["locs"][i, z], 1.0), obs=data[t])

    def guide(p, n):
        i = torch.arange(n)
        with pyro.plate("copies", n, dim=-1):
            z = None
            for t in pyro.markov(range(T)):
                logits = p["q0"] if z is None else p["qtrans"][i, z] + data[t]
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=logits))

    def copies(n):
        return {name: value.expand((n,) + value.shape).clone().requires_grad_()
                for name, value in base.items()}

    exact_params = copies(1)
    exact_loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        model, config_enumerate(guide), exact_params, 1)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(
        exact_loss, list(exact_params.values()), create_graph=True)])

    params = copies(N)
    config = {f"z_{t}": estimators.Enumerate() if t % 2 == 0 else estimators.ScoreFunction()
              for t in range(T)}
    with storch.handlers.estimator(config=config):
        elbo = storch.StorchELBO(max_plate_nesting=1, credit=credit)
        loss = elbo.differentiable_loss(model, guide, params, N)
    draws = torch.cat([g.reshape(N, -1) for g in torch.autograd.grad(loss, list(
        params.values()))], 1)
    mean, se = draws.mean(0), draws.std(0) / N ** 0.5
    assert se.max() < 0.08, se
    assert ((mean - exact.detach()).abs() < 4.5 * se + 1e-9).all(), (mean, exact, se)

    one = copies(1)
    with storch.handlers.estimator(config={f"z_{t}": estimators.Enumerate() for t in range(T)}):
        got = storch.StorchELBO(max_plate_nesting=1, credit=credit).differentiable_loss(
            model, guide, one, 1)
        vectorized = storch.StorchELBO(max_plate_nesting=1, credit=credit, num_particles=3,
                                       vectorize_particles=True).differentiable_loss(
            model, guide, one, 1)
    assert abs(float(vectorized.detach()) - float(got.detach())) < 1e-10
    hessian = torch.autograd.grad(
        torch.autograd.grad(got, one["qtrans"], create_graph=True)[0].sum(), one["qtrans"])[0]
    want = torch.autograd.grad(exact[3:12].sum(), exact_params["qtrans"])[0]
    assert (hessian - want).abs().max() < 1e-8


# ---- what cannot be contracted -------------------------------------------------------------
def _chain_guide(T=4):
    def guide():
        z = torch.tensor(0)
        for t in pyro.markov(range(T)):
            z = pyro.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(2, 2)[z]))

    return guide


def _order_model():
    """Replays z_0 and z_3 (which the guide never holds in one window) into one cost."""
    a = pyro.sample("z_0", dist.Categorical(logits=torch.zeros(2)))
    b = pyro.sample("z_3", dist.Categorical(logits=torch.zeros(2)))
    storch.add_cost("pair", (a + b).float())
    for t in (1, 2):
        pyro.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(2)))


def _stale_model():
    """Reads z_1 after its dim went to z_3 (history=1 in the model too)."""
    z, kept = torch.tensor(0), []
    for t in pyro.markov(range(4)):
        z = pyro.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(2, 2)[z]))
        kept.append(z)
    storch.add_cost("late", (kept[1] + kept[3]).float())


def _enumerating_model():
    """A global w, summed out of p(x, z) (the model enumerates it), that every step's
    observation depends on: -log sum_w p(x, z, w) couples all the guide's z_t."""
    w = pyro.sample("w", dist.Categorical(logits=torch.zeros(2)))
    z = torch.tensor(0)
    for t in pyro.markov(range(4)):
        z = pyro.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(2, 2)[z]))
        pyro.sample(f"x_{t}", dist.Normal((z + w).double(), 1.0),
                    obs=torch.tensor(0.0, dtype=torch.float64))


def _sampling_model():
    z = torch.tensor(0)
    for t in pyro.markov(range(4)):
        z = pyro.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(2, 2)[z]))
    pyro.sample("w", dist.Bernoulli(logits=torch.zeros(2)[z]),
                infer={"storch_estimator": None})


def _plated_guide():
    with pyro.plate("seqs", 2, dim=-1):
        _chain_guide()()


def _unplated_cost_model():
    with pyro.plate("seqs", 2, dim=-1):
        z = torch.tensor(0)
        for t in pyro.markov(range(4)):
            z = pyro.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(2, 2)[z]))
    storch.add_cost("total", z.float().sum(-1, keepdim=True))


@pytest.mark.parametrize("model, guide, match", [
    (_order_model, _chain_guide(), "cost 'pair' of the model depends on the guide's "
     "enumerated sites 'z_0' and 'z_3', which are never in one pyro.markov window"),
    (_stale_model, _chain_guide(), "cost 'late' depends on the enumerated site 'z_1'"),
    (_enumerating_model, _chain_guide(), "the model's enumerated site\\(s\\) 'w' \\(summed out "
     "of p\\(x, z\\)\\) depend on the guide's enumerated site 'z_0' and are not summed out "
     "yet when the model replays 'z_2'"),
    (_sampling_model, _chain_guide(), "site 'w' of the model is drawn per value of the "
     "guide's enumerated sites"),
    (_unplated_cost_model, _plated_guide, "cost 'total' of the model depends on the guide's "
     "enumerated site 'z_3' \\(a pyro.markov chain\\) but lies outside its plate"),
], ids=["windows", "stale", "model-enumerated", "model-sampled", "plates"])
def test_what_cannot_be_contracted_raises(model, guide, match):
    config = {f"z_{t}": estimators.Enumerate() for t in range(4)}
    config["w"] = estimators.Enumerate() if model is _enumerating_model else None
    config = {name: value for name, value in config.items() if value is not None}
    elbo = storch.StorchELBO(max_plate_nesting=1)
    with storch.handlers.estimator(config=config), pytest.raises(StorchError, match=match):
        elbo.loss(model, guide)


def test_subsampled_scaled_guide_chain_equals_trace_enum():
    """A guide chain in a subsampled plate (scale N / 3), observations under
    ``poutine.scale``: loss and gradients equal TraceEnum_ELBO's."""
    from pyro import poutine

    T, N = 5, 6
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(N, K, K, dtype=torch.float64, generator=generator).requires_grad_()
    V = torch.randn(K, K, dtype=torch.float64, generator=generator).requires_grad_()
    locs = torch.randn(K, dtype=torch.float64, generator=generator).requires_grad_()
    data = torch.randn(T, N, dtype=torch.float64, generator=generator)
    subsample = torch.tensor([0, 2, 5])

    def model():
        with pyro.plate("seqs", N, subsample=subsample, dim=-1) as i:
            z = None
            for t in pyro.markov(range(T)):
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=V[0] if z is None else V[z]))
                with poutine.scale(scale=0.5):
                    pyro.sample(f"x_{t}", dist.Normal(locs[z], 1.0), obs=data[t, i])

    def guide():
        with pyro.plate("seqs", N, subsample=subsample, dim=-1) as i:
            z = None
            for t in pyro.markov(range(T)):
                logits = W[i, 0] if z is None else W[i, z]
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=logits))

    elbo = storch.StorchELBO(max_plate_nesting=1, default_estimator=estimators.Enumerate())
    got = elbo.differentiable_loss(model, guide)
    want = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        model, config_enumerate(guide))
    _assert_close(got, want, [W, V, locs], tol=1e-10)


def _steps(T, markov):
    return pyro.markov(range(T)) if markov else range(T)


def _emission_model(p, data, markov=True, closed_form=False, ranks=None):
    """An HMM whose step t also has a binary w_t ~ p(w | z_t), absent from the guide (the
    model enumerates it: summed out of p(x, z)), x_t ~ N(locs[z_t] + shift[w_t], 1); with
    ``closed_form`` w_t is summed in the emission (a mixture) instead."""
    z = torch.tensor(0)
    for t in _steps(len(data), markov):
        z = pyro.sample(f"z_{t}", dist.Categorical(logits=p["trans"][z] if t else p["init"]))
        if closed_form:
            emission = dist.MixtureSameFamily(
                dist.Categorical(logits=p["emit"][z]),
                dist.Normal(p["locs"][z].unsqueeze(-1) + p["shift"], 1.0))
        else:
            w = pyro.sample(f"w_{t}", dist.Categorical(logits=p["emit"][z]))
            emission = dist.Normal(p["locs"][z] + p["shift"][w], 1.0)
            if ranks is not None:
                ranks.append(w.dim())
        pyro.sample(f"x_{t}", emission, obs=data[t])


def _emission_guide(p, data, markov=True, closed_form=False):
    z = torch.tensor(0)
    for t in _steps(len(data), markov):
        logits = p["qtrans"][z] + data[t] if t else p["q0"]
        z = pyro.sample(f"z_{t}", dist.Categorical(logits=logits))


@pytest.mark.parametrize("credit", ["order", "data_flow"])
@pytest.mark.parametrize("T", [5, 50])
def test_guide_chain_with_model_enumeration_equals_trace_enum(T, credit):
    """The guide enumerates a chain z_t (contracted), the model enumerates a w_t per step
    that the guide lacks (summed out of p(x, z) by a second, log-space chain, one term per
    window). Loss and gradients equal TraceEnum_ELBO's to 1e-5: with w_t summed in closed
    form in the model (T = 5 and 50), and at T = 5 with the same sites enumerated and no
    pyro.markov (exponential, exact). (TraceEnum_ELBO itself cannot run this model with
    pyro.markov: the model's enumeration dims collide with the guide's.) Dims stay bounded."""
    p, data = _params(T, seed=7, extra={"emit": (K, 2), "shift": (2,)})
    params = list(p.values())
    ranks = []
    elbo = storch.StorchELBO(max_plate_nesting=0, default_estimator=estimators.Enumerate(),
                             credit=credit)
    loss = elbo.differentiable_loss(lambda *a: _emission_model(*a, ranks=ranks),
                                    _emission_guide, p, data)
    trace_enum = TraceEnum_ELBO(max_plate_nesting=0)
    references = [(True, True)] + ([(False, False)] if T <= 5 else [])
    for markov, closed_form in references:
        want = trace_enum.differentiable_loss(config_enumerate(_emission_model),
                                              config_enumerate(_emission_guide), p, data,
                                              markov, closed_form)
        _assert_close(loss, want, params)
    assert max(ranks) <= 5  # two guide dims, two model dims, and the first guide site's
    assert abs(elbo.loss(_emission_model, _emission_guide, p, data) - loss.item()) < 1e-9
