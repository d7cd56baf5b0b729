"""Reading image files from untrusted datasets: bounded reads, a pixel cap, errors naming the file.

A dataset is data from elsewhere, and two kinds of file can take a machine down before
any decoding error is raised:

- a zip member that declares (or decompresses to) gigabytes: ``read_zip_member`` checks
  the member's declared size before reading and never reads past the cap, whatever the
  header says;
- an image whose header declares billions of pixels (a "decompression bomb"):
  ``decode_resized`` checks the declared size before decoding, and turns Pillow's own
  ``DecompressionBombWarning``/``Error`` into the same ``DatasetError``.
"""

from __future__ import annotations

import io
import warnings
import zipfile
import zlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

__all__ = ["MAX_MEMBER_BYTES", "MAX_IMAGE_PIXELS", "read_zip_member", "decode_resized"]

# Omniglot's drawings are at most 522 bytes (the official archives); 1 MiB is 2000 times that.
MAX_MEMBER_BYTES = 1 << 20
# 8192 x 8192: far above any few-shot dataset's images (ImageNet photos are a few megapixels),
# and below Pillow's own limit (89 Mpx), so Pillow never warns about an image read here.
MAX_IMAGE_PIXELS = 8192 * 8192


def read_zip_member(archive: zipfile.ZipFile, member: str, where: str) -> bytes:
    """The bytes of ``member``, at most ``MAX_MEMBER_BYTES`` of them; DatasetError naming ``where`` otherwise."""
    limit = MAX_MEMBER_BYTES
    try:
        info = archive.getinfo(member)
        if info.file_size > limit:
            raise DatasetError(f"{where} declares {info.file_size} bytes uncompressed, more than the {limit} allowed")
        with archive.open(info) as handle:
            data = handle.read(limit + 1)  # a header that lies about the size is read no further
    except DatasetError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as error:
        raise DatasetError(f"{where} cannot be read ({error})") from None
    if len(data) > limit:
        raise DatasetError(f"{where} decompresses to more than the {limit} bytes allowed")
    return data


def decode_resized(source: bytes | Path, size: int, mode: str, where: str) -> Image.Image:
    """The image in ``source`` (its bytes, or a file), converted to ``mode`` and resized to
    ``size`` x ``size`` with Lanczos; DatasetError naming ``where`` if it cannot be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DatasetError(
                        f"{where} declares {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS} allowed "
                        "(a decompression bomb, or not a dataset image)"
                    )
                return image.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
    except DatasetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DatasetError(f"{where} is too large to decode ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{where} is not a readable image ({error})") from None
