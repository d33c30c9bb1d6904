"""Thread defaults that hold up on a busy machine: the acert command bounds the spinning of
OpenMP's idle threads when other processes keep the cores busy as it starts (unless the user
chose a policy or a spin count), leaves OpenMP's default on an idle machine, and jobs that
share the cores split them."""

import os
import subprocess
import sys

import pytest

import acert.foundation.threads as threads
from acert.foundation.threads import (
    BOUNDED_SPIN,
    BUSY_SPIN,
    SPIN_COUNT,
    WAIT_POLICY,
    job_environment,
    others_busy,
    quiet_waiting,
    thread_share,
)

SHOW_POLICY = (
    "import os, sys\n"
    "import acert.foundation.threads\n"
    "acert.foundation.threads.others_busy = lambda: {busy}\n"
    "import acert.cli\n"
    "assert 'torch' not in sys.modules\n"
    "assert acert.cli.main(['certify', 'no-such-run']) == 2\n"
    "assert 'torch' in sys.modules\n"
    "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))\n"
)


@pytest.mark.parametrize(
    ("busy", "given", "expected"),
    [
        (True, {}, f"None {BUSY_SPIN}"),
        (False, {}, "None None"),
        (True, {WAIT_POLICY: "ACTIVE"}, "ACTIVE None"),
        (True, {SPIN_COUNT: "9"}, "None 9"),
    ],
)
def test_the_command_chooses_the_spinning_before_torch_loads(busy, given, expected):
    env = {key: value for key, value in os.environ.items() if key not in (WAIT_POLICY, SPIN_COUNT)}
    env.update(given)
    done = subprocess.run(
        [sys.executable, "-c", SHOW_POLICY.format(busy=busy)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines()[-1] == expected


def test_quiet_waiting_keeps_what_the_user_set():
    environ: dict[str, str] = {}
    assert quiet_waiting(environ, busy=lambda: True) == {SPIN_COUNT: BUSY_SPIN} == environ
    environ = {}
    assert quiet_waiting(environ, busy=lambda: False) == {} == environ
    environ = {WAIT_POLICY: "passive"}
    assert quiet_waiting(environ, busy=lambda: True) == {WAIT_POLICY: "passive"} == environ
    environ = {SPIN_COUNT: "0"}
    assert quiet_waiting(environ, busy=lambda: True) == {SPIN_COUNT: "0"} == environ


def _stat(ticks_per_core: list[list[int]]) -> str:
    total = [sum(column) for column in zip(*ticks_per_core, strict=True)]
    lines = ["cpu  " + " ".join(map(str, total)) + " 0 0"]
    for core, ticks in enumerate(ticks_per_core):
        lines.append(f"cpu{core} " + " ".join(map(str, ticks)) + " 0 0")
    return "\n".join([*lines, "intr 1 2 3", "ctxt 99"]) + "\n"


@pytest.mark.parametrize(
    ("second", "busy"),
    [  # ticks of the window (user nice system idle iowait irq softirq steal); core 0 idle
        ([[0, 0, 0, 10, 0, 0, 0, 0], [10, 0, 0, 0, 0, 0, 0, 0]], True),  # one core of work
        ([[0, 0, 0, 10, 0, 0, 0, 0], [1, 0, 1, 8, 0, 0, 0, 0]], False),  # 0.2 of a core
        ([[0, 0, 0, 10, 0, 0, 0, 0], [0, 0, 0, 4, 6, 0, 0, 0]], False),  # waiting for disk
        ([[0, 0, 0, 10, 0, 0, 0, 0], [0, 0, 0, 2, 0, 0, 0, 8]], True),  # the hypervisor's
    ],
)
def test_others_busy_counts_the_work_on_this_process_cores(tmp_path, monkeypatch, second, busy):
    stat = tmp_path / "stat"
    start = [[100, 0, 50, 1000, 5, 0, 0, 0], [100, 0, 50, 1000, 5, 0, 0, 0]]
    stat.write_text(_stat(start))
    after = [[a + d for a, d in zip(s, w, strict=True)] for s, w in zip(start, second, strict=True)]
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: stat.write_text(_stat(after)))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    assert others_busy(path=str(stat)) is busy
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0})  # core 1 is not ours
    stat.write_text(_stat(start))
    assert others_busy(path=str(stat)) is False


def test_others_busy_sees_a_real_burner():
    cores = sorted(os.sched_getaffinity(0))
    burner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"]
    )
    try:
        os.sched_setaffinity(burner.pid, {cores[0]})  # on a core of ours
        assert others_busy(window=0.3)
    finally:
        burner.kill()
        burner.wait()


def test_a_missing_proc_stat_falls_back_to_the_load_average(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 1.0, 1.0))
    assert others_busy(window=0, path=str(tmp_path / "none")) is True
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 1.0, 1.0))
    assert others_busy(window=0, path=str(tmp_path / "none")) is False


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
    assert job_environment(None) == {SPIN_COUNT: BOUNDED_SPIN}  # jobs beside each other
    assert job_environment(2, beside_others=False) == {  # a lone job chooses as it starts
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    }
