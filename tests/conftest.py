import os

from hypothesis import settings

# Deterministic in CI: the same examples every run, no example database, no flaky deadlines.
settings.register_profile("ci", derandomize=True, deadline=None, database=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
