"""Thread defaults that hold up on a busy machine: the acert command bounds the spinning of
OpenMP's idle threads (unless the user chose a policy or a spin count), and jobs that share the
cores split them."""

import os
import subprocess
import sys

import pytest

from acert.foundation.threads import (
    BOUNDED_SPIN,
    SPIN_COUNT,
    WAIT_POLICY,
    job_environment,
    quiet_waiting,
    thread_share,
)

SHOW_POLICY = (
    "import os, sys\n"
    "import acert.cli\n"
    "assert 'torch' not in sys.modules\n"
    "acert.cli.main(['list'])\n"
    "assert 'torch' in sys.modules\n"
    "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))\n"
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, f"None {BOUNDED_SPIN}"),
        ({WAIT_POLICY: "ACTIVE"}, "ACTIVE None"),
        ({SPIN_COUNT: "9"}, "None 9"),
    ],
)
def test_the_command_bounds_the_spinning_before_torch_loads(given, expected):
    env = {key: value for key, value in os.environ.items() if key not in (WAIT_POLICY, SPIN_COUNT)}
    env.update(given)
    done = subprocess.run(
        [sys.executable, "-c", SHOW_POLICY], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == expected


def test_quiet_waiting_keeps_what_the_user_set():
    environ: dict[str, str] = {}
    assert quiet_waiting(environ) == {SPIN_COUNT: BOUNDED_SPIN} == environ
    environ = {WAIT_POLICY: "passive"}
    assert quiet_waiting(environ) == {WAIT_POLICY: "passive"} == environ
    environ = {SPIN_COUNT: "0"}
    assert quiet_waiting(environ) == {SPIN_COUNT: "0"} == environ


def test_jobs_share_the_cores(monkeypatch):
    assert [thread_share(jobs, cores=8) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.delenv(SPIN_COUNT, raising=False)
    monkeypatch.setenv(WAIT_POLICY, "ACTIVE")
    assert job_environment(3) == {
        WAIT_POLICY: "ACTIVE",
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
    }
    monkeypatch.delenv(WAIT_POLICY)
    assert job_environment(None) == {SPIN_COUNT: BOUNDED_SPIN}
