"""Thread defaults that hold up on a busy machine: the acert command makes OpenMP's idle threads
sleep (unless the user chose a policy), and jobs that share the cores split them."""

import os
import subprocess
import sys

import pytest

from acert._threads import WAIT_POLICY, job_environment, quiet_waiting, thread_share

SHOW_POLICY = (
    "import os, sys\n"
    "import acert.cli\n"
    "assert 'torch' not in sys.modules\n"
    "acert.cli.main(['list'])\n"
    "assert 'torch' in sys.modules\n"
    "print(os.environ.get('OMP_WAIT_POLICY'))\n"
)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_sets_the_wait_policy_before_torch_loads(given, expected):
    env = {key: value for key, value in os.environ.items() if key != WAIT_POLICY}
    if given is not None:
        env[WAIT_POLICY] = given
    done = subprocess.run(
        [sys.executable, "-c", SHOW_POLICY], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == expected


def test_quiet_waiting_keeps_a_policy_the_user_set():
    environ: dict[str, str] = {}
    assert quiet_waiting(environ) == "PASSIVE" and environ == {WAIT_POLICY: "PASSIVE"}
    environ = {WAIT_POLICY: "active"}
    assert quiet_waiting(environ) == "active" and environ == {WAIT_POLICY: "active"}


def test_jobs_share_the_cores(monkeypatch):
    assert [thread_share(jobs, cores=8) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv(WAIT_POLICY, "ACTIVE")
    assert job_environment(3) == {
        WAIT_POLICY: "ACTIVE",
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
    }
    monkeypatch.delenv(WAIT_POLICY)
    assert job_environment(None) == {WAIT_POLICY: "PASSIVE"}
