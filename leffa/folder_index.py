"""The files of a folder of your own data, by id: the one indexer of the converter
(``python -m data_prep folder``) and of the prediction folder (``--data.predict_folder``,
``leffa.data.predict_folder``), so that both read the same folder the same way.

An id is a file's stem (``alice.jpg`` -> ``alice``). Only files whose suffix, in any case, is one
of the given ones count (folders and other files are ignored). Two files of one id (``alice.jpg``
and ``alice.png``) are one error naming both: which of them is meant cannot be guessed. In a pair
file, a name is an id once its image extension, if it has one, is dropped (``alice.jpg`` and
``alice`` name the same id; ``alice.v2`` is the id ``alice.v2``).
"""

from __future__ import annotations

from pathlib import Path

from leffa.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "index_folder", "id_of"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def index_folder(folder: Path, suffixes: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """{id: file} of the files of an existing ``folder`` with one of ``suffixes`` (lower case), in
    file-name order; two files of one id are a :class:`UserError` naming both."""
    index: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in index:
            raise UserError(f"{index[path.stem]} and {path.name} have the same id; keep one of them")
        index[path.stem] = path
    return index


def id_of(name: str) -> str:
    """A pair-file name as an id: ``alice.jpg`` -> ``alice``; a name without an image extension is the id."""
    path = Path(name)
    return path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else name
