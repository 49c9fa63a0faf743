"""Sharded training on 2 gloo ranks (CPU): FSDP2 / DTensor EMAs equal a single-process EMA of the
same trajectory bitwise, issue no collective in update(), and save, load and reshard.

The scenarios live in ``scenarios.py``; one spawn runs all the 2-rank ones (then one the 1-rank
ones), and each test here reports one scenario on every rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover (the CPU wheel has gloo)
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import scenarios
from ranks import run_scenarios

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ranks")


@pytest.fixture(scope="module")
def outcomes(folder: Path) -> dict[str, list[str]]:
    tmp = folder
    two = run_scenarios("scenarios", scenarios.TWO_RANKS, world=2, tmp=tmp)
    (tmp / "one").mkdir()
    for name in scenarios.TWO_RANKS:  # the 1-rank scenarios read the 2-rank files
        if (tmp / name).exists():
            (tmp / "one" / name).symlink_to(tmp / name)
    one = run_scenarios("scenarios", scenarios.ONE_RANK, world=1, tmp=tmp / "one")
    return {**two, **one}


@pytest.mark.parametrize("name", scenarios.TWO_RANKS + scenarios.ONE_RANK)
def test_scenario(outcomes: dict[str, list[str]], name: str) -> None:
    failed = [f"rank {r}:\n{out}" for r, out in enumerate(outcomes[name]) if out != "ok"]
    assert not failed, "\n".join(failed)


def test_the_full_file_loads_in_one_process_without_torch_distributed(
        outcomes: dict[str, list[str]], folder: Path) -> None:
    """The file rank 0 wrote from the sharded EMA is a plain emakit file."""
    assert outcomes["files_and_distributed_checkpoints"] == ["ok", "ok"]
    folder = folder / "files_and_distributed_checkpoints"
    import emakit

    ref = torch.load(folder / "ref.pt", weights_only=True)
    ema = emakit.EMA(scenarios.make_model(6), decay=0.75)
    emakit.load(ema, folder / "ema.safetensors")
    for name, value in ref["ref"]["shadows"].items():
        assert torch.equal(ema.state_dict()["shadows"][name], value), name
