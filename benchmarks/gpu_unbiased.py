"""Unbiasedness on an accelerator: storch_pyro estimators with every tensor on ``--device``,
against closed-form gradients, plus a short SVI run of the learned control variates.

Bernoulli toy: :math:`b_d \\sim \\mathrm{Bernoulli}(\\sigma(\\phi_d))`, cost
:math:`f(b) = \\sum_d (b_d - t_d)^2`, so :math:`\\partial_{\\phi_d} \\mathbb{E} f =
\\sigma(\\phi_d)(1 - \\sigma(\\phi_d))(1 - 2 t_d)`.
Categorical toys: a one-hot :math:`z \\sim \\mathrm{OneHotCategorical}(\\mathrm{softmax}
(\\psi))` over 4 categories, cost :math:`g(z) = w^\\top z`, so
:math:`\\partial_{\\psi_k} \\mathbb{E} g = \\pi_k (w_k - \\sum_j \\pi_j w_j)`; and two such
latents under ``.to_event(1)``, coupled (:func:`event_toy`, exact by enumerating 16 pairs).

Each estimator's mean over ``--draws`` gradient estimates must lie within 4.5 standard errors
of the exact gradient in every coordinate (3 to 8 coordinates: a false alarm under
unbiasedness has probability below 1e-4 per estimator). Power, at the default 2000 draws: the
standard errors printed are 0.004-0.013 against largest exact coordinates of 0.24 and 0.42 (one
Bernoulli vector, one categorical), 0.017-0.019 against 0.50 (two categoricals), so a bias of
15-17 % of the largest coordinate fails (LAX with an untrained network is weaker: s.e.
0.19 against 2.4). ``Enumerate`` must match exactly. Then 30 SVI steps of REBAR (learned
:math:`\\eta, \\lambda`), RELAX and LAX on the device must keep every parameter finite and
on the device. Prints a table and exits non-zero on a failure.

    python -m benchmarks.gpu_unbiased --device cuda
"""

import argparse
import sys

import pyro
import pyro.distributions as dist
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators
from storch_pyro.diagnostics import flat_grad, gradient_stats

TARGET = (0.0, 1.0, 0.3)
PHI = (-0.7, 0.4, 1.2)
PSI = (0.3, -1.0, 1.5, 0.1)
W = (0.5, -1.0, 2.0, 0.3)


def toy(phi, target, estimator):
    b = storch.sample("b", dist.Bernoulli(logits=phi).to_event(1), estimator=estimator)
    storch.add_cost("c", ((b - target) ** 2).sum(-1))


def plate_toy(phi, target, estimator):
    """The same toy with the coordinates in a plate (for estimators that enumerate)."""
    with pyro.plate("p", len(target)):
        b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimator)
        storch.add_cost("c", (b - target) ** 2)


def categorical_toy(psi, w, estimator):
    z = storch.sample("z", dist.OneHotCategorical(logits=psi), estimator=estimator)
    storch.add_cost("c", (z * w).sum(-1))


def event_toy(psi, w, estimator):
    """Two one-hot latents under ``.to_event(1)``, coupled: :math:`g = (w^\\top z_1)
    (w^\\top z_2) + w^\\top z_1`."""
    z = storch.sample("z", dist.OneHotCategorical(logits=psi).to_event(1), estimator=estimator)
    values = (z * w).sum(-1)
    storch.add_cost("c", values[..., 0] * values[..., 1] + values[..., 0])


def event_exact(psi, w):
    """The gradient of :func:`event_toy`'s expected cost by enumerating the 16 pairs."""
    psi = psi.detach().requires_grad_()
    pi = psi.softmax(-1)
    joint = pi[0][:, None] * pi[1][None, :]
    expected = (joint * (w[:, None] * w[None, :] + w[:, None])).sum()
    return torch.autograd.grad(expected, [psi])[0].reshape(-1)


def normal_toy(mu, estimator):
    x = storch.sample("x", dist.Normal(mu, 1.0).to_event(1), estimator=estimator)
    storch.add_cost("c", (x ** 2).sum(-1))


class ControlVariate(torch.nn.Module):
    """A small MLP over the last dim, that dim summed away."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z).squeeze(-1)


def check(name, loss_fn, params, exact, draws) -> bool:
    pyro.clear_param_store()
    stats = gradient_stats(loss_fn, params, draws, exact=exact)
    z = float(stats.z_scores.abs().max())
    ok = z < 4.5 and stats.mean.device == exact.device
    print(f"| {name} | {z:.2f} | {float(stats.std_error.max()):.4f} | "
          f"{stats.mean.device} | {'yes' if ok else 'NO'} |")
    return ok


def check_training(name, model, args, device) -> bool:
    """30 SVI steps; every parameter must stay finite and on ``device``."""
    pyro.clear_param_store()
    svi = pyro.infer.SVI(model, None, pyro.optim.Adam({"lr": 1e-2}),
                         loss=storch.StorchELBO(max_plate_nesting=1))
    losses = [svi.step(*args) for _ in range(30)]
    params = dict(pyro.get_param_store().named_parameters())
    finite = all(torch.isfinite(p).all() for p in params.values())
    placed = all(p.device.type == torch.device(device).type for p in params.values())
    ok = finite and placed and all(map(lambda v: v == v, losses))
    print(f"| {name} (30 SVI steps, {len(params)} params) | loss {losses[-1]:.3f} | — | "
          f"{'on device' if placed else 'NOT on device'} | {'yes' if ok else 'NO'} |")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args(argv)
    device, draws = args.device, args.draws
    pyro.set_rng_seed(0)
    phi = torch.tensor(PHI, device=device, requires_grad=True)
    target = torch.tensor(TARGET, device=device)
    p = torch.sigmoid(phi.detach())
    exact = p * (1 - p) * (1 - 2 * target)
    psi = torch.tensor(PSI, device=device, requires_grad=True)
    w = torch.tensor(W, device=device)
    pi = psi.detach().softmax(-1)
    exact_categorical = pi * (w - (pi * w).sum())
    mu = torch.tensor(PHI, device=device, requires_grad=True)
    exact_normal = 2 * mu.detach()
    elbo = storch.StorchELBO(max_plate_nesting=1)

    def bernoulli(estimator):
        return lambda: elbo.differentiable_loss(toy, None, phi, target, estimator)

    def categorical(estimator):
        return lambda: elbo.differentiable_loss(categorical_toy, None, psi, w, estimator)

    torch.manual_seed(1)
    relax_net = ControlVariate(3).to(device)
    lax_net = ControlVariate(3).to(device)
    bernoulli_cases = {
        "ScoreFunction(4, LeaveOneOut)": estimators.ScoreFunction(
            n_samples=4, baseline=baselines.LeaveOneOut()),
        "ScoreFunction(MovingAverage)": estimators.ScoreFunction(
            baseline=baselines.MovingAverage(0.9)),
        "ARM": estimators.ARM(),
        "DisARM": estimators.DisARM(),
        "REBAR (fixed)": estimators.REBAR(learn=False),
        "RELAX (fixed, rebar_term)": estimators.RELAX(relax_net, rebar_term=True, learn=False),
    }
    categorical_cases = {
        "categorical UnorderedSet(2)": estimators.UnorderedSet(n_samples=2),
        "categorical UnorderedSet(3, quadrature)": estimators.UnorderedSet(
            n_samples=3, method="quadrature"),
        "categorical ARM": estimators.ARM(),
        "categorical DisARM": estimators.DisARM(),
        "categorical REBAR (fixed)": estimators.REBAR(learn=False),
        "categorical DisARM, ascending order": estimators.DisARM(order="ascending"),
    }
    failed = False
    print(f"device: {phi.device}, {draws} draws per estimator; exact Bernoulli "
          f"{[round(v, 4) for v in exact.tolist()]}, categorical "
          f"{[round(v, 4) for v in exact_categorical.tolist()]}")
    print("| estimator | max abs z | max s.e. | on device | ok |")
    print("|---|--:|--:|---|---|")
    for name, estimator in bernoulli_cases.items():
        failed |= not check(name, bernoulli(estimator), [phi], exact, draws)
    for name, estimator in categorical_cases.items():
        failed |= not check(name, categorical(estimator), [psi], exact_categorical, draws)
    psi2 = torch.tensor([PSI, PSI[::-1]], device=device, requires_grad=True)
    for name, estimator in [("2 categoricals .to_event, DisARM", estimators.DisARM()),
                            ("2 categoricals .to_event, ARM (descending)",
                             estimators.ARM(order="descending"))]:
        failed |= not check(
            name, lambda estimator=estimator: elbo.differentiable_loss(
                event_toy, None, psi2, w, estimator),
            [psi2], event_exact(psi2, w), draws)
    failed |= not check(
        "LAX (Normal, fixed network)",
        lambda: elbo.differentiable_loss(normal_toy, None, mu, estimators.LAX(lax_net)),
        [mu], exact_normal, draws)
    for name, model, params, truth, estimator in [
        ("Enumerate (exact)", plate_toy, (phi, target), exact, estimators.Enumerate()),
        ("categorical Enumerate (exact)", categorical_toy, (psi, w), exact_categorical,
         estimators.Enumerate()),
    ]:
        gradient = flat_grad(elbo.differentiable_loss(model, None, *params, estimator),
                             [params[0]])
        error = float((gradient - truth).abs().max())
        ok = error < 1e-5
        failed |= not ok
        print(f"| {name} | error {error:.1e} | — | {gradient.device} | "
              f"{'yes' if ok else 'NO'} |")

    def learned_phi():
        return pyro.param("phi", torch.tensor(PHI, device=device))

    failed |= not check_training(
        "REBAR (learned)", lambda e: toy(learned_phi(), target, e), (estimators.REBAR(),),
        device)
    failed |= not check_training(
        "RELAX (rebar_term)", lambda e: toy(learned_phi(), target, e),
        (estimators.RELAX(ControlVariate(3).to(device), rebar_term=True),), device)
    failed |= not check_training(
        "LAX", lambda e: normal_toy(learned_phi(), e),
        (estimators.LAX(ControlVariate(3).to(device)),), device)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
