"""Drop-in front ends with other libraries' names and verbs, running on emakit's engine.

Migrating is an import line:

- :mod:`emakit.compat.torch_ema`: ``ExponentialMovingAverage`` of ``torch-ema``
  (``from emakit.compat.torch_ema import ExponentialMovingAverage``);
- :mod:`emakit.compat.timm`: ``ModelEmaV3`` and ``ModelEmaV2`` of ``timm.utils``
  (``from emakit.compat.timm import ModelEmaV3``).

Each keeps the original constructor, verbs and ``state_dict`` format; where emakit's numbers
differ from the original's (the rounding of one update, fp32 shadows for 16-bit models) the
class docstring and ``docs/migration.md`` say where and by how much. Nothing here is imported by
``import emakit``; each module imports torch.
"""

__all__: list[str] = []
