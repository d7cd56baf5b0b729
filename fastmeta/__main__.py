"""``python -m fastmeta ...``: the same command as ``fastmeta``, and what torchrun launches."""

from fastmeta.cli import main

raise SystemExit(main())
