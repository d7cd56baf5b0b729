"""``learn2learn.text.datasets``: NewsClassification is refused (see the package docstring)."""


class NewsClassification:
    """Refused: learn2learn downloads this dataset (HuffPost news headlines); fastmeta
    reads only local files and has no reader for it."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "fastmeta.l2l.text.datasets.NewsClassification is not provided: learn2learn downloads it, and "
            "fastmeta has no reader for it (use l2l.data.MetaDataset over your own torch Dataset)"
        )


__all__ = ["NewsClassification"]
