"""Prediction inputs from a plain folder instead of shards.

Layout: ``person/<id>.<jpg|png>``, ``reference/<id>.*`` (or ``garment/<id>.*``, the name
``python -m data_prep folder`` reads: one folder serves both; not both), ``mask/<id>.png``
(255 = generate; for pose transfer all 255), ``densepose/<id>.*``; ``mask`` and ``densepose`` are
named like the person. Files are indexed by ``leffa.folder_index``, as the converter does: an id is
a file's stem, and two files of one id (``a.jpg``, ``a.png``) are a UserError naming both. The pairs
come from ``pairs.txt``, else from ``test_pairs.txt`` (the test list of a training folder); each line
``<person id> <reference id>`` (an id may carry its image extension) is one sample, keyed
``<person>__<reference>`` when the ids differ (unpaired try-on) and ``<person>`` when they are the
same (``leffa.schema.SampleKey.folder``; in keys ``.``, ``/``, ``\\`` and whitespace of an id become
``_``, as in shard keys; UTF-8, two columns; a malformed line is a UserError naming the file and
line). Without either file each person is paired with the reference of the same id.
Images are read as the shard members are (``leffa.images.read_image``: EXIF orientation
applied, 16-bit scaled to 8 bits, transparent pixels on white, or on black in masks and DensePose)
and go through the shard pipeline's per-key resize stage. A mask or DensePose image whose aspect
ratio differs from its person photo's (by more than ``leffa.images.ASPECT_TOLERANCE``) is one UserError
naming the files before the first sample; a file that cannot be read is a UserError naming it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from leffa.images import BLACK, WHITE, check_aspect_ratios, read_image
from leffa.data.transforms import resize_sample
from leffa.errors import MissingFileError, UserError
from leffa.folder_index import id_of, index_folder
from leffa.pair_file import read_pair_file
from leffa.schema import SampleKey, sanitize_id

__all__ = ["FolderPairs"]

FOLDERS = ("person", "reference", "mask", "densepose")
REFERENCE_ALIAS = "garment"  # the training folder's name for reference/
PAIR_FILES = ("pairs.txt", "test_pairs.txt")
# sample key: (folder, PIL mode, background of transparent pixels, decode a JPEG at reduced scale)
READ_AS = {"tgt": ("person", "RGB", WHITE, True), "ref": ("reference", "RGB", WHITE, True),
           "mask": ("mask", "L", BLACK, False), "densepose": ("densepose", "RGB", BLACK, False)}  # fmt: skip
# what PIL raises for a file that is no image, truncated, or over its pixel limit
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class FolderPairs(Dataset):
    """Map-style dataset of (person, reference) pairs from a folder (see the module docstring)."""

    def __init__(self, root: str | Path, height: int, width: int):
        self.root, self.height, self.width = Path(root), height, width
        folders = {f: self.root / f for f in FOLDERS}
        if (self.root / REFERENCE_ALIAS).is_dir():
            if folders["reference"].is_dir():
                raise UserError(f"{self.root} holds both reference/ and {REFERENCE_ALIAS}/; keep one of them")
            folders["reference"] = self.root / REFERENCE_ALIAS
        missing = [f for f, path in folders.items() if not path.is_dir()]
        if missing:
            raise MissingFileError(f"{self.root} lacks the folders {missing} (expected {', '.join(FOLDERS)}; "
                                   f"{REFERENCE_ALIAS}/ may stand for reference/)")
        self.files = {f: index_folder(path) for f, path in folders.items()}
        pairs_file = next((self.root / n for n in PAIR_FILES if (self.root / n).is_file()), None)
        if pairs_file is not None:
            rows = read_pair_file(pairs_file, ("person", "reference"))
            self.pairs = [(id_of(person), id_of(reference)) for _, (person, reference) in rows]
        else:
            self.pairs = [(stem, stem) for stem in self.files["person"]]
        for person, reference in self.pairs:
            for folder, stem in (("person", person), ("mask", person), ("densepose", person), ("reference", reference)):
                if stem not in self.files[folder]:
                    raise MissingFileError(f"no {folder} image for '{stem}' in {folders[folder]}")
        self.keys = [SampleKey.folder(sanitize_id(person), sanitize_id(reference)).build()
                     for person, reference in self.pairs]  # an id no key can hold: a UserError now
        people = dict.fromkeys(person for person, _ in self.pairs)
        check_aspect_ratios(((self.files["person"][p], (self.files["mask"][p], self.files["densepose"][p]))
                             for p in people), self.root)  # fmt: skip

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        person, reference = self.pairs[index]
        sample = {"key": self.keys[index], "meta": {"tgt_id": person, "ref_id": reference}}
        for name, (folder, mode, background, draft) in READ_AS.items():
            path = self.files[folder][reference if folder == "reference" else person]
            try:
                sample[name], _ = read_image(path, mode, (self.height, self.width) if draft else None, background)
            except READ_ERRORS as err:
                raise UserError(f"cannot read image {path}: {err}; replace or remove it") from None
        return resize_sample(sample, self.height, self.width)
