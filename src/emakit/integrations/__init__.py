"""Trainer integrations: thin adapters that drive :class:`emakit.EMA` from a training framework.

- :mod:`emakit.integrations.transformers`: ``EMACallback`` for Hugging Face ``Trainer`` (and the
  TRL trainers that subclass it);
- :mod:`emakit.integrations.lightning`: the ``EMA`` callback for Lightning 2.x;
- :mod:`emakit.integrations.keras`: ``EMACallback`` for Keras 3 (torch backend without copies,
  the other backends through numpy).

Each module imports its framework when it is imported itself; ``import emakit`` imports none of
them. None does EMA arithmetic: they call the engine's public verbs (``update(step=)``,
``swapped()``, ``state_dict()``, ``model_state_dict()``) at the framework's events. The pages
``docs/integrations/*.md`` show the lines to add and what each callback does at each event.
"""

__all__: list[str] = []
