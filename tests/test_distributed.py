"""Data-parallel training (torch.distributed, DDP) matches one process on the global batch,
and estimator state is synchronized (storch_pyro.distributed).

Two gloo processes on 127.0.0.1 run tests/distributed_worker.py once (all cases); the
single-process reference runs here. Draws are made equal per data point (see the worker),
so the runs must agree to float rounding: a missing or doubled synchronization (e.g. state
averaged over one rank only, a gradient not averaged, a baseline or control variate not
trained on the other rank's data) moves parameters and state by 1e-3 or more after one step,
far above the 1e-6 tolerance.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests import distributed_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for both processes; a deadlock fails the test instead of hanging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path_factory.mktemp("distributed"))
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_worker", str(rank), "2", str(port), out],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("the distributed run did not finish: deadlock?")
    finally:
        for proc in procs:  # cleaned up whatever happened
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("case", worker.CASES)
def test_two_processes_equal_one_on_the_global_batch(ranks, case):
    """ScoreFunction + MovingAverage, RLOO, Learned (baseline network under DDP), DisARM,
    RELAX (control-variate network in the param store and under DDP; or in the param store
    only, outside DDP; or, in a PyroModule with module_local_params, under DDP only) and
    REBAR (eta and temperature: pyro.params, outside DDP), the control variates trained on
    the variance gradient: the parameters and the estimator state after the steps equal a
    single process's."""
    reference = worker.train(case, rank=0, world=1)
    for result in ranks:
        got = result[case]
        if case == "rebar":  # a site's eta and temperature exist where the site is drawn
            assert set(got) < set(reference)
        else:
            assert set(got) == set(reference)
        for name, value in got.items():
            assert torch.allclose(value, reference[name], atol=1e-6, rtol=0), name
    # the runs trained something: the reference moved away from the initial parameters
    torch.manual_seed(0)
    initial = worker.make_objective(case).state_dict()
    moved = max(float((reference[f"param:{k}"] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-3


def test_free_draws_state_identical_on_every_rank(ranks):
    """A moving average and a GumbelSoftmax schedule step counter, with different draws
    per rank: equal on both ranks; the control (sync_state=False) differs."""
    first, second = (result["free_draws"] for result in ranks)
    synchronized = ["store:storch_pyro.baseline.z.moving_average", "store:tau.step"]
    for name in synchronized:
        assert torch.equal(first[name], second[name]), name
    assert float(first["store:tau.step"]) == worker.STEPS
    # names known after the first step: later steps take the one-all_reduce path
    assert int(first["gathers"]) == int(second["gathers"]) == 1
    control = "store:storch_pyro.baseline.w.moving_average"
    assert not torch.equal(first[control], second[control])


def test_structures_that_differ_between_ranks_do_not_deadlock(ranks):
    """Episodes of different lengths per rank and step (and a step where one rank records
    no state): the run finishes (the fixture's timeout) and every site's average, also
    those of time steps only one rank reached, is the same on both ranks."""
    first, second = (result["episodes"] for result in ranks)
    assert set(first) == set(second)
    assert len(first) == worker.STEPS + 2  # a0 .. a4: rank 1's longest episode
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.slow  # ~15 s: two more processes importing torch and Pyro
def test_example_under_torchrun():
    """examples/distributed_vae.py --smoke, launched by torchrun with 2 processes (gloo):
    it trains, and asserts that the estimator state is the same on both ranks."""
    pytest.importorskip("sklearn")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "examples/distributed_vae.py", "--smoke"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        log = "timed out"
    finally:
        if proc.poll() is None:  # torchrun and its workers, as one process group
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    rows = [line for line in log.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and "nan" not in rows[0], log[-3000:]
