"""The bound engines' numbers on fixed seeds are those recorded before their traversal became a
graph walk (issue 19): bit for bit on the processor and torch version that recorded them, up to
another processor's kernel rounding elsewhere (tests/kit/graph_reference.py)."""

from __future__ import annotations

import torch

from tests.kit.graph_reference import REFERENCE, compute, processor


def test_bounds_radii_and_clean_pass_match_the_recorded_reference():
    recorded = torch.load(REFERENCE)
    same_machine = recorded["processor"] == processor() and recorded["torch"] == str(
        torch.__version__
    )
    numbers = compute()
    assert sorted(numbers) == sorted(recorded["numbers"])
    for key, expected in recorded["numbers"].items():
        if same_machine:
            assert torch.equal(numbers[key], expected), key
        else:
            torch.testing.assert_close(numbers[key], expected, rtol=1e-6, atol=0, msg=key)
