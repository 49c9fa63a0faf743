"""``python -m emakit``: the same as the ``emakit`` command."""

from emakit.cli import main

raise SystemExit(main())
