import os
import re

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


#: The ``quick`` subset (``python -m pytest -q -m quick``, under a minute on 2 cores): one
#: unbiasedness test per estimator family on a toy, the loss against Pyro's, credit
#: assignment, handlers, errors, the docs and the README's code. Patterns of ``<file>::<test
#: name with parameters>`` in which only ``*`` is special (any characters), kept here rather
#: than as decorators so that the subset is chosen in one place.
QUICK = (
    # Unbiasedness, one toy per estimator family (|mean - exact| < 4.5 s.e., as in the suite).
    "test_unbiased.py::test_seed_story_unbiased[pathwise]",
    "test_unbiased.py::test_bernoulli_toy_unbiased[score-k4-leave-one-out-to_event]",
    "test_antithetic.py::test_bernoulli_toy_unbiased[disarm-to_event]",
    "test_control_variates.py::test_unbiased_on_bernoulli[re*-logits-toy]",
    "test_enumeration.py::test_enumerate_scg_exact_gradient_and_value*",
    "test_unordered_set.py::test_scg_unbiased[categorical-k3]",
    "test_relaxation.py::test_straight_through_gradient_is_that_of_the_probabilities*",
    # The loss: Pyro's values and gradients, credit assignment, handlers, state.
    "test_elbo.py::test_same_loss_as_trace_elbo*",
    "test_elbo.py::test_loss_values_agree*",
    "test_elbo.py::test_sample_dim_left_of_plates*",
    "test_elbo.py::test_add_cost_*",
    "test_elbo.py::test_moving_average_*",
    "test_dropin.py::test_reparameterized_pair_same_gradient_as_trace_elbo*",
    "test_dropin.py::test_invalid_pair_same_error_or_warning_as_pyro*",
    "test_credit_assignment.py::test_cost_*",
    "test_credit_assignment.py::test_*_not_credited*",
    "test_handlers.py::*",
    "test_state.py::*",
    "test_validation_no_redraw.py::test_validation_modes_draw_the_same_steps",
    "test_validation_no_redraw.py::test_*_still_caught",
    # Errors, docs, the README's code and the set-up's example.
    "test_errors.py::*",  # but not test_import_* (fresh interpreters, ~20 s): QUICK_EXCEPT
    "test_error_catalog.py::*",
    "test_docs.py::*",
    "test_examples_smoke.py::test_example_smoke[generative_story]",
)
QUICK_EXCEPT = ("test_errors.py::test_import_changes_no_global_setting*",)


def _matches(pattern: str, name: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), name) is not None


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by marker
def pytest_collection_modifyitems(config, items):
    """Marks the :data:`QUICK` tests ``quick``; when the whole suite is collected, each
    pattern must match a test (a renamed test must not silently leave the subset)."""
    unmatched = set(QUICK)
    for item in items:
        name = f"{item.path.name}::{item.name}"
        matched = [pattern for pattern in QUICK if _matches(pattern, name)]
        excepted = any(_matches(pattern, name) for pattern in QUICK_EXCEPT)
        if matched and not excepted and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.quick)
            unmatched.difference_update(matched)
    if unmatched and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        message = f"tests/conftest.py: QUICK patterns match no test: {sorted(unmatched)}"
        if not hasattr(config, "workerinput"):
            raise pytest.UsageError(message)
        # Under pytest-xdist (-n) each worker collects the whole suite and runs this hook,
        # but a worker's UsageError reaches the user as an INTERNALERROR without its message:
        # a test that fails with it is run first instead, kept whatever ``-m``/``-k`` select.
        config.stash[_QUICK_ERROR] = message


_QUICK_ERROR = pytest.StashKey[str]()


class _QuickPatternsError(pytest.Item):
    """Fails with the message of unmatched :data:`QUICK` patterns (under pytest-xdist)."""

    def __init__(self, *, message: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.message = message

    def runtest(self) -> None:
        pytest.fail(self.message, pytrace=False)

    def reportinfo(self):
        return self.path, None, "tests/conftest.py: QUICK"


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_quick_error(session, config, items):
    """After ``-m`` and ``-k`` deselected: the failing test is kept whatever they select."""
    message = config.stash.get(_QUICK_ERROR, None)
    if message is not None:
        items.insert(0, _QuickPatternsError.from_parent(session, name="QUICK_patterns",
                                                        message=message))


@pytest.fixture(autouse=True)
def _forced_credit(monkeypatch):
    """``STORCH_PYRO_TEST_CREDIT=data_flow`` runs the tests with that credit assignment as
    StorchELBO's default (e.g. the unbiasedness suite with credit by data flow)."""
    credit = os.environ.get("STORCH_PYRO_TEST_CREDIT")
    if credit:
        from storch_pyro import StorchELBO

        monkeypatch.setitem(StorchELBO.__init__.__kwdefaults__, "credit", credit)
    yield
