import subprocess
import sys


def test_import_emakit_is_light():
    code = ("import sys, emakit; heavy = [m for m in ('torch', 'numpy', 'lightning', "
            "'transformers', 'keras', 'matplotlib') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_numpy_user_never_imports_torch():
    code = ("import sys, numpy as np, emakit; e = emakit.EMA({'w': np.zeros(2)}); e.update(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
