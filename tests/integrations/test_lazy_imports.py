"""The integration and compat packages import their framework only when their module is used."""

import os
import subprocess
import sys

import pytest


def test_the_packages_import_no_framework():
    code = ("import sys, emakit, emakit.integrations, emakit.compat; heavy = [m for m in "
            "('torch', 'lightning', 'transformers', 'keras', 'timm', 'torch_ema') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("module", "framework"), [
    ("emakit.integrations.lightning", "from lightning.pytorch.callbacks import Callback"),
    ("emakit.integrations.transformers", "from transformers import Trainer"),
    ("emakit.integrations.keras", "import keras"),
])
def test_each_module_imports_nothing_beyond_its_framework(module, framework):
    """After the framework itself, importing the adapter adds only emakit's own modules."""
    pytest.importorskip(framework.split()[1])
    code = (f"import sys, emakit; {framework}; before = set(sys.modules); import {module}; "
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith('emakit')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "KERAS_BACKEND": "torch"})
    assert out.stdout.strip() == "[]"
