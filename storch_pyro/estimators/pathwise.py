"""The pathwise (reparameterization) estimator."""

from torch.distributions import Distribution

from storch_pyro.estimators.base import Draw, Estimator, Site


class Pathwise(Estimator):
    """Reparameterization gradient (Kingma & Welling 2014; Rezende et al. 2014).

    The value is drawn as :math:`z = g(\\epsilon, \\theta)` with parameter-free noise
    :math:`\\epsilon`, so gradients flow through :math:`z` into the costs:
    :math:`\\hat g = \\nabla_\\theta f(g(\\epsilon, \\theta))`. No score term, no baseline.
    Needs ``fn.has_rsample``.

    Example::

        z = storch.sample("z", dist.Normal(mu, 1.0), estimator=estimators.Pathwise())
    """

    @classmethod
    def supports(cls, fn: Distribution) -> bool:
        return bool(fn.has_rsample)

    def draw(self, site: Site) -> Draw:
        return Draw(site.fn.rsample(site.sample_shape(self.n_samples)), size=self.n_samples)

    def _unsupported_reason(self, fn: Distribution) -> str:
        return " (it is not reparameterizable: has_rsample is False)"
