import pyro
import pytest


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Each test starts with an empty param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
