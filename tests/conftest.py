"""Hypothesis profiles: the suite draws the same examples on every run (``ci``, the default), so
a green commit stays green; ``--hypothesis-profile=explore`` draws new ones on every run (and
1000 of them where a test does not set its own count).

Both found real edge cases while this project grew (subnormal constants, results 2^-53 of their
inputs after long gaps): explore before a release, and turn what it finds into tests.
"""

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile("ci")
