"""learn2learn's ``learn2learn.text``: its one dataset, ``datasets.NewsClassification``,
is downloaded from the web, which fastmeta never does; it is not provided."""

from . import datasets

__all__ = ["datasets"]
