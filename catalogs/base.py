"""What every catalogs module shares without importing another: the error type and the name
of the images table's pixel column."""

from __future__ import annotations

PIXEL_COLUMN = "image"  # images table: the HF Image struct {bytes, path} holding the PNG


class CorpusError(ValueError):
    """The directory is not a readable corpus, or a query is malformed."""
