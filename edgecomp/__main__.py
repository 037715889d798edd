"""``python -m edgecomp`` is the same as the ``edgecomp`` command."""

from edgecomp.cli import main

raise SystemExit(main())
