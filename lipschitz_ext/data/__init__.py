"""Data from files: text corpora, token shards and tokenizers (``text.py``, with the built-in
tiny-shakespeare in ``corpora/``), and image classification sets (``images.py``: IDX,
CIFAR-10)."""

from .images import ImageData, ImageDataError, load_image_data
from .text import ByteTokenizer, CharTokenizer, DataError, TokenData, load_data

__all__ = ["ByteTokenizer", "CharTokenizer", "DataError", "ImageData", "ImageDataError", "TokenData", "load_data",
           "load_image_data"]
