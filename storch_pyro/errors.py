"""Exceptions and warnings raised by storch_pyro.

Every error names the site it concerns and says what to do about it.
"""


class StorchError(ValueError):
    """A model, guide or configuration that storch_pyro cannot estimate gradients for."""


class UnsupportedDistributionError(StorchError, TypeError):
    """An estimator was applied to a distribution it cannot handle."""


class MaskShapeError(StorchError, RuntimeError):
    """A mask (``poutine.mask``, ``obs_mask``) that does not broadcast to its site's batch
    shape; also a ``RuntimeError``, the error Pyro's losses let through from torch there."""


class NonFiniteCostError(StorchError):
    """A cost (or log-density used as a cost) is NaN or infinite."""


class UnusedConfigWarning(UserWarning):
    """A handler config names a site that never appeared while the handler was active."""
