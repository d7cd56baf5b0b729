"""The error a dataset raises when its files are there but cannot be used."""


class DatasetError(ValueError):
    """A corrupt archive, an unreadable image, or a dataset laid out differently than expected.

    The message names the file (``archive.zip:member`` for a member of an archive).
    A missing file or folder raises FileNotFoundError instead; bad arguments (too few
    classes for the ways, too few images for shots + queries) raise a plain ValueError.
    """
