"""The error a dataset raises when its files are there but cannot be used."""


class DatasetError(ValueError):
    """A corrupt archive, an unreadable image, or a dataset laid out differently than expected.

    The message names the file (``archive.zip:member`` for a member of an archive).
    A missing file or folder raises FileNotFoundError instead; bad arguments (too few
    classes for the ways, too few images for shots + queries) raise a plain ValueError.
    """


def check_regular_file(path, what: str):
    """``path``'s stat, after checking it is a regular file (through symlinks): a FIFO named
    ``.png`` would block the reader forever, and a symlink loop or a dangling link raised a
    raw OSError. DatasetError naming the file otherwise."""
    import os
    import stat

    try:
        info = os.stat(path)
    except OSError as error:
        raise DatasetError(f"{what}: {path} cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) else \
            "a device or socket"
        raise DatasetError(f"{what}: {path} is not a regular file ({kind}); an image file is expected")
    return info
