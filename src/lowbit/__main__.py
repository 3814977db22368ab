"""``python -m lowbit`` runs the ``lowbit`` command."""

from lowbit.cli import main

raise SystemExit(main())
