"""pytest's doctest collection of this package (``--doctest-modules``; not part of the library).

Each module here imports its framework at import time. Keras 3 picks its backend once, at import:
the doctests and tests use torch (``KERAS_BACKEND=torch``, as ``tests/integrations/conftest.py``
sets). A module whose framework is not installed is not collected, instead of failing the run.
"""

import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

collect_ignore = [f"{module}.py" for module, package in
                  (("keras", "keras"), ("lightning", "lightning"),
                   ("transformers", "transformers"))
                  if importlib.util.find_spec(package) is None]
