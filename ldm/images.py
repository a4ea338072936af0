"""Opening image files that may come from strangers (targets, training images, figures): regular
files only (a FIFO would block, a folder is not an image), decoded by PIL's raster plug-ins named
in RASTER_FORMATS only, never its full set (EPS would hand the file to Ghostscript)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ldm.errors import InputError

RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ImageFileError(InputError):
    """A path that is not a readable image of RASTER_FORMATS; the message names it."""


def read_rgb(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, upright (`to_rgb`, which needs the file's own tags)."""
    from ldm.extractors.preprocessing import to_rgb   # torch: not for figures' --help
    path = Path(path)
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file" if path.exists() else "missing"
        raise ImageFileError(f"{str(path)!r} is {kind}, not an image file")
    try:
        with Image.open(path, formats=RASTER_FORMATS) as image:
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError:
        raise ImageFileError(f"{str(path)!r} is not a readable image: not one of the formats "
                             f"read here ({', '.join(RASTER_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageFileError(f"{str(path)!r} is not a readable image: {err}") from None
