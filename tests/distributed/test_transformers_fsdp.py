"""The Hugging Face callback on an FSDP2 model with 2 gloo ranks (``hf_scenarios.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover (the CPU wheel has gloo)
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import hf_scenarios
from ranks import run_scenarios

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", hf_scenarios.ALL)
def test_scenario(tmp_path: Path, name: str) -> None:
    outcomes = run_scenarios("hf_scenarios", [name], world=2, tmp=tmp_path, timeout=240)
    failed = [f"rank {r}:\n{out}" for r, out in enumerate(outcomes[name]) if out != "ok"]
    assert not failed, "\n".join(failed)
