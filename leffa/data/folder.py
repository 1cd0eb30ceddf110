"""Prediction inputs from a plain folder instead of shards.

Layout: ``person/<id>.<jpg|png>``, ``reference/<id>.*`` (or ``garment/<id>.*``, the name
``python -m data_prep folder`` reads: one folder serves both; not both), ``mask/<id>.png``
(255 = generate; for pose transfer all 255), ``densepose/<id>.*``; ``mask`` and ``densepose`` are
named like the person. The pairs come from ``pairs.txt``, else from ``test_pairs.txt`` (the test
list of a training folder); each line ``<person id> <reference id>`` is one sample, keyed
``<person>__<reference>`` when the ids differ (unpaired try-on) and ``<person>`` when they are the
same (UTF-8, two columns; a malformed line is a UserError naming the file and line). Without either
file each person is paired with the reference of the same id.
Samples go through the shard pipeline's own decode and per-key resize stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from leffa.data.decode import decode_sample
from leffa.data.transforms import resize_sample
from leffa.errors import MissingFileError, UserError
from leffa.pair_file import read_pair_file

__all__ = ["FolderPairs"]

FOLDERS = ("person", "reference", "mask", "densepose")
REFERENCE_ALIAS = "garment"  # the training folder's name for reference/
PAIR_FILES = ("pairs.txt", "test_pairs.txt")
EXTENSIONS = (".jpg", ".jpeg", ".png")


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
        self.files = {f: {p.stem: p for p in sorted(path.iterdir()) if p.suffix.lower() in EXTENSIONS}
                      for f, path in folders.items()}
        pairs_file = next((self.root / n for n in PAIR_FILES if (self.root / n).is_file()), None)
        if pairs_file is not None:
            rows = read_pair_file(pairs_file, ("person", "reference"))
            self.pairs = [(Path(person).stem, Path(reference).stem) for _, (person, reference) in rows]
        else:
            self.pairs = [(stem, stem) for stem in self.files["person"]]
        for person, reference in self.pairs:
            for folder, stem in (("person", person), ("mask", person), ("densepose", person), ("reference", reference)):
                if stem not in self.files[folder]:
                    raise MissingFileError(f"no {folder} image for '{stem}' in {folders[folder]}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        person, reference = self.pairs[index]
        key = person if person == reference else f"{person}__{reference}"
        raw = {
            "__key__": key,
            "tgt.jpg": self.files["person"][person].read_bytes(),
            "ref.jpg": self.files["reference"][reference].read_bytes(),
            "mask.png": self.files["mask"][person].read_bytes(),
            "densepose.png": self.files["densepose"][person].read_bytes(),
            "json": json.dumps({"tgt_id": person, "ref_id": reference}).encode(),
        }
        return resize_sample(decode_sample(raw, draft_size=(self.height, self.width)), self.height, self.width)
