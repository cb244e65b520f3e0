import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Each test starts with an empty param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Thousands of steps on tiny tensors: one intra-op thread is fastest, and avoids OpenMP
    spin-waits that make tiny ops 1000x slower when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
