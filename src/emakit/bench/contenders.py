"""The contenders of the update benchmark: emakit's paths and every installed peer library.

Each factory takes ``(model, decay)`` and returns a callable doing one EMA update after an
optimizer step, or raises ``ImportError`` when its library is not installed.

Example:
    >>> import torch
    >>> from emakit.bench.contenders import CONTENDERS
    >>> update = CONTENDERS["emakit"](torch.nn.Linear(3, 2), 0.999)
    >>> _ = update()
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CONTENDERS", "Update", "timm_model_ema"]

Update = Callable[[], Any]


def _emakit(**options: Any) -> Callable[[nn.Module, float], Update]:
    def make(model: nn.Module, decay: float) -> Update:
        import emakit

        return emakit.EMA(model, decay=decay, **options).update
    return make


def _nonfinite_skip(flat: bool) -> Callable[[nn.Module, float], Update]:
    def make(model: nn.Module, decay: float) -> Update:
        import emakit

        source = _flat_twin(model) if flat else model
        return emakit.EMA(source, decay=decay, policy=emakit.Policy(nonfinite="skip")).update
    return make


def _flat_twin(model: nn.Module) -> nn.Module:
    """A copy of the model laid out by :func:`emakit.flatten_parameters` (the other contenders
    keep the model as it was built)."""
    import copy

    import emakit

    twin = copy.deepcopy(model)
    emakit.flatten_parameters(twin)
    return twin


def _emakit_flat(model: nn.Module, decay: float) -> Update:
    import emakit

    return emakit.EMA(_flat_twin(model), decay=decay).update


def _emakit_eager(flat: bool) -> Callable[[nn.Module, float], Update]:
    """emakit on torch's kernels (``EMAKIT_NATIVE=0`` while its plan is made): the update
    without emakit's compiled CPU kernels, as where no C compiler is found."""
    def make(model: nn.Module, decay: float) -> Update:
        import os

        import emakit

        ema = emakit.EMA(_flat_twin(model) if flat else model, decay=decay)
        before = os.environ.get("EMAKIT_NATIVE")
        os.environ["EMAKIT_NATIVE"] = "0"
        try:
            ema.update()  # the plan is made here, and kept
        finally:
            if before is None:
                del os.environ["EMAKIT_NATIVE"]
            else:
                os.environ["EMAKIT_NATIVE"] = before
        return ema.update
    return make


def _emakit_multi(flat: bool) -> Callable[[nn.Module, float], Update]:
    def make(model: nn.Module, decay: float) -> Update:
        import emakit

        source = _flat_twin(model) if flat else model
        return emakit.MultiEMA(source, decays=(decay, 1.0 - (1.0 - decay) / 10)).update
    return make


def _emakit_swap(model: nn.Module, decay: float) -> Update:
    import emakit

    ema = emakit.EMA(model, decay=decay)

    def swap() -> None:
        with ema.swapped():
            pass
    return swap


class ClassicSnippet:
    """The classic shadow-weights snippet (``register`` / ``update`` / ``apply_shadow`` /
    ``restore`` over a dict of shadows): its update makes a new tensor per parameter."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.shadow = {n: p.data.clone() for n, p in model.named_parameters() if p.requires_grad}

    def update(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                new_average = (1.0 - self.decay) * param.data + self.decay * self.shadow[name]
                self.shadow[name] = new_average.clone()


def _classic(model: nn.Module, decay: float) -> Update:
    return ClassicSnippet(model, decay).update


def timm_model_ema() -> Any:
    """timm's ``utils/model_ema.py``, loaded from its file (``timm.utils`` needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        raise ImportError("timm is not installed")
    file = Path(spec.origin).parent / "utils" / "model_ema.py"
    loader = importlib.util.spec_from_file_location("_emakit_timm_model_ema", file)
    if loader is None or loader.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def _timm(model: nn.Module, decay: float) -> Update:
    ema = timm_model_ema().ModelEmaV3(model, decay=decay)
    return lambda: ema.update(model)


def _averaged_model(model: nn.Module, decay: float) -> Update:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),  # type: ignore[no-untyped-call]
                        use_buffers=True)
    return lambda: ema.update_parameters(model)


def _torch_ema(model: nn.Module, decay: float) -> Update:
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=False)
    update: Update = ema.update
    return update


def _ema_pytorch(foreach: bool) -> Callable[[nn.Module, float], Update]:
    def make(model: nn.Module, decay: float) -> Update:
        from ema_pytorch import EMA

        ema = EMA(model, beta=decay, update_after_step=0, update_every=1, use_foreach=foreach,
                  power=1e9)  # huge power: the warmup is over at once, steady-state decay
        ema.update()
        update: Update = ema.update
        return update
    return make


def _diffusers(foreach: bool) -> Callable[[nn.Module, float], Update]:
    def make(model: nn.Module, decay: float) -> Update:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=decay, foreach=foreach)
        return lambda: ema.step(model.parameters())
    return make


CONTENDERS: dict[str, Callable[[nn.Module, float], Update]] = {
    "emakit": _emakit(),
    "emakit loop": _emakit(foreach=False),
    "emakit flat": _emakit_flat,
    "emakit eager": _emakit_eager(False),
    "emakit flat eager": _emakit_eager(True),
    "emakit multi x2": _emakit_multi(False),
    "emakit flat multi x2": _emakit_multi(True),
    "emakit every=4": _emakit(every=4),
    "emakit skip_nonfinite": _nonfinite_skip(False),
    "emakit flat skip_nonfinite": _nonfinite_skip(True),
    "emakit swap round trip": _emakit_swap,
    "timm ModelEmaV3": _timm,
    "AveragedModel foreach": _averaged_model,
    "torch-ema": _torch_ema,
    "ema-pytorch": _ema_pytorch(False),
    "ema-pytorch foreach": _ema_pytorch(True),
    "diffusers": _diffusers(False),
    "diffusers foreach": _diffusers(True),
    "classic snippet": _classic,
}
"""Name -> factory. ``emakit every=4`` is timed per optimizer step (one call = one step);
``eager``: on torch's kernels instead of emakit's compiled CPU kernels (``EMAKIT_NATIVE=0``);
``multi x2`` keeps two averages (decay and a 10x longer window) and is compared with the flat pass
over the bytes it must move, ``4 + 8 * 2`` per fp32 parameter."""


def flat_reference(n: int, device: str | torch.device = "cpu") -> Update:
    """One in-place ``lerp_`` over a flat fp32 buffer of ``n`` elements: the single-pass limit."""
    shadow = torch.zeros(n, device=device)
    source = torch.ones(n, device=device)
    return lambda: shadow.lerp_(source, 0.001)
