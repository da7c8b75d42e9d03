"""``python -m handbackprop``: see :mod:`handbackprop.cli`."""

from handbackprop.cli import main

raise SystemExit(main())
