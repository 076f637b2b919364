"""Find the image files under the paths given on the command line, in a stable order."""

from __future__ import annotations

import os
from collections.abc import Iterable

# What the server decodes (JPEG, PNG, WebP, GIF, BMP, TIFF), by file name.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)


def is_image_name(name: str) -> bool:
    """Whether a file name has the suffix of an image format the server decodes."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def image_files(paths: Iterable[str]) -> list[str]:
    """Absolute paths of the image files named or found under ``paths``, each once.

    A file named explicitly is taken whatever its suffix; folders are walked
    recursively (without following links to folders) in sorted order, keeping
    files with image suffixes. The order is that of ``paths``, then of the walk.
    Raises FileNotFoundError for a path that does not exist.
    """
    seen: set[str] = set()
    found: list[str] = []

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            found.append(path)

    for given in paths:
        path = os.path.abspath(given)
        if os.path.isdir(path):
            for folder, folders, names in os.walk(path):
                folders.sort()
                for name in sorted(names):
                    if is_image_name(name):
                        add(os.path.join(folder, name))
        elif os.path.exists(path):
            add(path)
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    return found
