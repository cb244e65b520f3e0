"""Discrete VAEs for the estimator benchmarks, each as plain PyTorch functions (for the
hand-written estimators and the exact/test bounds) and as a Pyro model/guide pair (for
StorchELBO and Pyro's losses). The latent site is called ``"z"``.

- :class:`BinaryVAE`: 200 Bernoulli latents; ``linear`` (encoder and decoder one affine map)
  or ``nonlinear`` (two hidden layers of 200 LeakyReLU(0.3) units each way), the protocol of
  ARM (Yin & Zhou 2019), RELAX (Grathwohl et al. 2018) and DisARM (Dong et al. 2020): a
  factorized Bernoulli prior with learned logits, the decoder's output bias initialised to
  the logit of the training mean.
- :class:`CategoricalVAE`: 20 latents, each a one-hot Categorical(10) with a uniform prior
  (the latent structure of Kool, van Hoof & Welling 2020), encoder with hidden layers of 512
  and 256 ReLU units, decoder the mirror image.

Both define :math:`f(z) = \\log q(z \\mid x) - \\log p(x, z)`, so :math:`-\\mathrm{ELBO} =
\\mathbb{E}_q f`, summed over the batch.
"""

import itertools
import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

MODELS = ("binary-linear", "binary-nonlinear", "categorical")
#: Negative slope of the nonlinear binary VAE's LeakyReLUs (0.3 in the DisARM authors' code).
LEAKY_SLOPE = 0.3
#: Latent spaces up to this size are enumerated for exact gradients (bias measurements).
MAX_ENUMERATION = 4096


class DiscreteVAE(nn.Module):
    """Shared part: ``encoder`` gives the logits of :math:`q(z \\mid x)`, ``decoder`` maps
    a latent to pixel logits. Subclasses define the distributions."""

    kind: str = ""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    # ---- plain PyTorch ------------------------------------------------------------------
    def q(self, x: torch.Tensor) -> torch.distributions.Distribution:
        """:math:`q(z \\mid x)`, batch shape ``x.shape[:-1]``, one event per data point."""
        raise NotImplementedError

    def prior(self) -> torch.distributions.Distribution:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits for latents ``z`` (any leading dims)."""
        raise NotImplementedError

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(x, z)` per data point (``z`` may have extra leading sample dims)."""
        likelihood = torch.distributions.Bernoulli(logits=self.decode(z))
        return likelihood.log_prob(x).sum(-1) + self.prior().log_prob(z)

    def cost(self, x: torch.Tensor, z: torch.Tensor, q=None) -> torch.Tensor:
        """:math:`f(z) = \\log q(z \\mid x) - \\log p(x, z)` per data point."""
        q = self.q(x) if q is None else q
        return q.log_prob(z) - self.log_joint(x, z)

    @torch.no_grad()
    def test_bound(self, x: torch.Tensor, n_samples: int = 100, chunk: int = 100) -> float:
        """Mean over ``x`` of the ``n_samples``-sample importance-weighted bound
        :math:`\\log \\frac1K \\sum_k p(x, z_k) / q(z_k \\mid x)` (Burda et al. 2016)."""
        total = 0.0
        for start in range(0, len(x), chunk):
            batch = x[start:start + chunk]
            q = self.q(batch)
            z = q.sample((n_samples,))
            log_w = self.log_joint(batch, z) - q.log_prob(z)
            total += float((torch.logsumexp(log_w, 0) - math.log(n_samples)).sum())
        return total / len(x)

    def latent_support(self) -> Optional[torch.Tensor]:
        """Every latent configuration, stacked (leading dim), if there are at most
        :data:`MAX_ENUMERATION`; else ``None``."""
        raise NotImplementedError

    def exact_cost(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`-\\mathrm{ELBO} = \\sum_x \\sum_z q(z \\mid x) f(z)` by enumeration."""
        support = self.latent_support()
        if support is None:
            raise ValueError(f"{type(self).__name__}: the latent space is too large to enumerate")
        support = support.reshape(support.shape[:1] + (1,) * (x.dim() - 1) + support.shape[1:])
        q = self.q(x)
        log_q = q.log_prob(support)
        return (log_q.exp() * (log_q - self.log_joint(x, support))).sum()

    # ---- Pyro ---------------------------------------------------------------------------
    def _site_to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The Pyro site's value as the latent the decoder takes (identity by default)."""
        return z

    def _prior_site(self):
        raise NotImplementedError

    def _posterior_site(self, logits: torch.Tensor):
        raise NotImplementedError

    def model(self, x: torch.Tensor, register: bool = False) -> None:
        """Pyro model: ``z ~ prior``, ``x ~ Bernoulli(decoder(z))``, in a plate over the batch.
        ``register``: ``pyro.module`` the decoder (``TraceGraph_ELBO`` only backpropagates
        when a param site exists; the benchmark's optimizer holds the parameters anyway)."""
        if register:
            pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self._prior_site())
            logits = self.decode(self._site_to_latent(z))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, register: bool = False, infer: Optional[dict] = None):
        """Pyro guide: ``z ~ q(z | x)`` in the same plate (``infer`` goes to the site)."""
        if register:
            pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self._posterior_site(self.encoder(x)), infer=infer or {})


class BinaryVAE(DiscreteVAE):
    """200 (``n_latent``) Bernoulli latents, linear or nonlinear (see the module docstring).

    :param train_mean: per-pixel training mean; the decoder's output bias starts at its logit.
    """

    kind = "binary"

    def __init__(
        self, n_pixel: int, train_mean: torch.Tensor, n_latent: int = 200,
        nonlinear: bool = False, hidden: int = 200,
    ) -> None:
        if nonlinear:
            encoder = nn.Sequential(
                nn.Linear(n_pixel, hidden), nn.LeakyReLU(LEAKY_SLOPE),
                nn.Linear(hidden, hidden), nn.LeakyReLU(LEAKY_SLOPE), nn.Linear(hidden, n_latent),
            )
            decoder = nn.Sequential(
                nn.Linear(n_latent, hidden), nn.LeakyReLU(LEAKY_SLOPE),
                nn.Linear(hidden, hidden), nn.LeakyReLU(LEAKY_SLOPE), nn.Linear(hidden, n_pixel),
            )
        else:
            encoder = nn.Linear(n_pixel, n_latent)
            decoder = nn.Linear(n_latent, n_pixel)
        super().__init__(encoder, decoder)
        self.n_latent = n_latent
        self.prior_logits = nn.Parameter(torch.zeros(n_latent))
        output = decoder[-1] if nonlinear else decoder
        with torch.no_grad():
            mean = train_mean.clamp(1e-3, 1 - 1e-3)
            output.bias.copy_(torch.log(mean) - torch.log1p(-mean))

    def q(self, x):
        return torch.distributions.Independent(
            torch.distributions.Bernoulli(logits=self.encoder(x)), 1
        )

    def prior(self):
        return torch.distributions.Independent(
            torch.distributions.Bernoulli(logits=self.prior_logits), 1
        )

    def decode(self, z):
        return self.decoder(z)

    def latent_support(self):
        if 2**self.n_latent > MAX_ENUMERATION:
            return None
        rows = list(itertools.product((0.0, 1.0), repeat=self.n_latent))
        return torch.tensor(rows, device=self.prior_logits.device)

    def _prior_site(self):
        return dist.Bernoulli(logits=self.prior_logits).to_event(1)

    def _posterior_site(self, logits):
        return dist.Bernoulli(logits=logits).to_event(1)


class CategoricalVAE(DiscreteVAE):
    """``n_latent`` (20) one-hot Categorical(``n_cat`` = 10) latents, uniform prior; with
    ``n_latent = 1`` the Pyro site has no event dim (one Categorical per image)."""

    kind = "categorical"

    def __init__(
        self, n_pixel: int, n_latent: int = 20, n_cat: int = 10, hidden=(512, 256)
    ) -> None:
        encoder = nn.Sequential(
            nn.Linear(n_pixel, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(), nn.Linear(hidden[1], n_latent * n_cat),
        )
        decoder = nn.Sequential(
            nn.Linear(n_latent * n_cat, hidden[1]), nn.ReLU(), nn.Linear(hidden[1], hidden[0]),
            nn.ReLU(), nn.Linear(hidden[0], n_pixel),
        )
        super().__init__(encoder, decoder)
        self.n_latent, self.n_cat = n_latent, n_cat
        self.register_buffer("prior_logits", torch.zeros(n_latent, n_cat))

    def _logits(self, x):
        return self.encoder(x).reshape(x.shape[:-1] + (self.n_latent, self.n_cat))

    def q(self, x):
        return torch.distributions.Independent(
            torch.distributions.OneHotCategorical(logits=self._logits(x)), 1
        )

    def prior(self):
        return torch.distributions.Independent(
            torch.distributions.OneHotCategorical(logits=self.prior_logits), 1
        )

    def decode(self, z):
        return self.decoder(z.flatten(-2))

    def latent_support(self):
        if self.n_cat**self.n_latent > MAX_ENUMERATION:
            return None
        eye = torch.eye(self.n_cat, device=self.prior_logits.device)
        rows = itertools.product(range(self.n_cat), repeat=self.n_latent)
        return torch.stack([eye[list(row)] for row in rows])

    # With one latent the Pyro site is a plain OneHotCategorical (no ``.to_event``): the
    # setting of Kool et al. (2020), where estimators that draw per batch element (e.g.
    # ``UnorderedSet``) apply.
    def _site_to_latent(self, z):
        return z.unsqueeze(-2) if self.n_latent == 1 else z

    def _prior_site(self):
        if self.n_latent == 1:
            return dist.OneHotCategorical(logits=self.prior_logits[0])
        return dist.OneHotCategorical(logits=self.prior_logits).to_event(1)

    def _posterior_site(self, logits):
        if self.n_latent == 1:
            return dist.OneHotCategorical(logits=logits)
        shape = logits.shape[:-1] + (self.n_latent, self.n_cat)
        return dist.OneHotCategorical(logits=logits.reshape(shape)).to_event(1)


def make_model(name: str, n_pixel: int, train_mean: torch.Tensor, latents: int = 0) -> DiscreteVAE:
    """``binary-linear``, ``binary-nonlinear`` or ``categorical``; ``latents > 0`` overrides
    the number of latent variables (small values make the exact gradient computable)."""
    if name in ("binary-linear", "binary-nonlinear"):
        return BinaryVAE(
            n_pixel, train_mean, n_latent=latents or 200, nonlinear=name == "binary-nonlinear"
        )
    if name == "categorical":
        return CategoricalVAE(n_pixel, n_latent=latents or 20)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
