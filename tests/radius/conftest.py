"""What the radius tests share: the trained model of tests/kit/radius.py."""

import pytest

from tests.kit.radius import make_trained


@pytest.fixture(scope="module")
def trained():
    """A tiny MLP trained on 3 noisy Gaussian blobs, and 40 test points (tests/kit/radius.py)."""
    return make_trained()
