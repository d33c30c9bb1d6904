import itertools

import pytest

from acert.foundation.schedules import EpsSchedule, smoothed_ramp


def test_ramp_ends_and_switch_point():
    assert smoothed_ramp(0.0) == 0.0
    assert smoothed_ramp(1.0) == pytest.approx(1.0)
    # α·mid^4 with α = 1 / (mid^3 (4 - 3 mid)) gives mid / (4 - 3 mid) at the switch
    assert smoothed_ramp(0.25) == pytest.approx(0.25 / 3.25)
    assert smoothed_ramp(0.125) == pytest.approx((0.125**4) / (0.25**3 * 3.25))


def test_ramp_joins_with_equal_slope_and_is_monotone():
    h = 1e-6
    left = (smoothed_ramp(0.25) - smoothed_ramp(0.25 - h)) / h
    right = (smoothed_ramp(0.25 + h) - smoothed_ramp(0.25)) / h
    assert left == pytest.approx(right, rel=1e-4)
    values = [smoothed_ramp(i / 1000) for i in range(1001)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    # the linear part has the slope (1 - v(mid)) / (1 - mid)
    assert right == pytest.approx((1 - 0.25 / 3.25) / 0.75, rel=1e-4)


def test_schedule_phases():
    schedule = EpsSchedule(eps_max=0.4, steps_per_epoch=10, stn_epochs=1, reg_epochs=4)
    assert schedule(0) == 0.0 and schedule(9) == 0.0
    assert schedule(10) == 0.0  # ramp start
    assert 0 < schedule(11) < schedule(30) < 0.4
    assert schedule(20) == pytest.approx(0.4 * 0.25 / 3.25)  # a quarter of the ramp
    assert schedule(50) == pytest.approx(0.4)
    assert schedule(10_000) == pytest.approx(0.4)
    assert schedule.in_warmup(49) and not schedule.in_warmup(50)
