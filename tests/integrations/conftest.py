"""Shared setup of the trainer-integration tests.

Keras 3 reads its backend once, at import: the tests run it on torch (``KERAS_BACKEND=torch``,
set here, before any test module imports keras). Each framework's import is skipped cleanly
where it is not installed (``pytest.importorskip`` in the test modules).

Warnings are errors in this repository; the filters below silence only framework messages that
the tests cannot avoid on a 2-core CPU machine, each named exactly:

- Lightning's advice to use more DataLoader workers (``PossibleUserWarning``; the tests use
  in-memory tensors, where workers would only cost process start-ups);
- Lightning's note that a small dataset logs less often than ``log_every_n_steps``;
- torch's deprecation of ``LeafSpec()``, which Lightning 2.6 still calls when it flattens the
  dataloaders (a ``FutureWarning`` raised inside Lightning, not by emakit);
- in the Keras tests only: numpy 2's deprecation of ``__array__`` without ``copy=``, which
  Keras 3.15's torch backend triggers in ``predict`` (``np.array`` on a torch tensor inside
  ``keras.src.backend.torch``).
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: peers, oracle

FILTERS = (
    "ignore:The '\\w+_dataloader' does not have many workers:UserWarning",
    "ignore:The number of training batches .* is smaller than the logging interval:UserWarning",
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning",
)


KERAS_FILTERS = (
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        path = str(item.fspath)
        if path.startswith(here):
            specs = FILTERS + (KERAS_FILTERS if path.endswith("test_keras.py") else ())
            for spec in specs:
                item.add_marker(pytest.mark.filterwarnings(spec))
