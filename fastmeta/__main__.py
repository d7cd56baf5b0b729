"""``python -m fastmeta ...``: the same command as ``fastmeta``, and what torchrun launches."""

from fastmeta.tools.cli import main

raise SystemExit(main())
