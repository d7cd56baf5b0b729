"""learn2learn's ``learn2learn.vision``: ``benchmarks`` (``get_tasksets``), ``models``,
``datasets`` (local files only, nothing is downloaded) and ``transforms``."""

from . import benchmarks, datasets, models, transforms

__all__ = ["benchmarks", "datasets", "models", "transforms"]
