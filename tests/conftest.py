"""Hypothesis profiles: the suite draws the same examples on every run (``ci``, the default), so
a green commit stays green; ``--hypothesis-profile=explore`` draws new ones on every run (and
1000 of them where a test does not set its own count).

Both found real edge cases while this project grew (subnormal constants, results 2^-53 of their
inputs after long gaps): explore before a release, and turn what it finds into tests.
"""

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile("ci")


def pytest_sessionstart(session):
    """Build or load emakit's native CPU kernels before any test runs.

    A failed build is not retried in a process, so the first update must not fall inside a
    test that patches ``os.open`` or ``Tensor.__bool__``: that would send the rest of the run
    to torch's kernels. Where there is no compiler this is a no-op (torch's kernels run).
    """
    try:
        from emakit.backends.torch import native
    except ImportError:  # torch not installed
        return
    native.kernels()


@pytest.fixture(params=["native", "eager"])
def kernels(request, monkeypatch):
    """Run a test on emakit's native CPU kernels and on torch's (``EMAKIT_NATIVE=1`` / ``0``):
    torch's kernels still serve CUDA and machines without a C compiler."""
    if request.param == "native":
        from emakit.backends.torch import native

        if native.kernels() is None:
            pytest.skip(f"native kernels unavailable here: {native.status()}")
    monkeypatch.setenv("EMAKIT_NATIVE", "1" if request.param == "native" else "0")
    return request.param
