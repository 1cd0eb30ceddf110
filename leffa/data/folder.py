"""Prediction inputs from a plain folder instead of shards.

Layout: ``person/<id>.<jpg|png>``, ``reference/<id>.*``, ``mask/<id>.png`` (255 = generate; for
pose transfer all 255), ``densepose/<id>.*``; ``mask`` and ``densepose`` are named like the person.
Without ``pairs.txt`` each person is paired with the reference of the same id; with it, each line
``<person id> <reference id>`` is one sample (unpaired try-on), keyed ``<person>__<reference>``
(UTF-8, two columns; a malformed line is a UserError naming the file and line).
Samples go through the shard pipeline's own decode and per-key resize stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from leffa.data.decode import decode_sample
from leffa.data.transforms import resize_sample
from leffa.errors import MissingFileError
from leffa.pair_file import read_pair_file

__all__ = ["FolderPairs"]

FOLDERS = ("person", "reference", "mask", "densepose")
EXTENSIONS = (".jpg", ".jpeg", ".png")


class FolderPairs(Dataset):
    """Map-style dataset of (person, reference) pairs from a folder (see the module docstring)."""

    def __init__(self, root: str | Path, height: int, width: int):
        self.root, self.height, self.width = Path(root), height, width
        missing = [f for f in FOLDERS if not (self.root / f).is_dir()]
        if missing:
            raise MissingFileError(f"{self.root} lacks the folders {missing} (expected {', '.join(FOLDERS)})")
        self.files = {f: {p.stem: p for p in sorted((self.root / f).iterdir()) if p.suffix.lower() in EXTENSIONS}
                      for f in FOLDERS}
        pairs_file = self.root / "pairs.txt"
        if pairs_file.is_file():
            rows = read_pair_file(pairs_file, ("person", "reference"))
            self.pairs = [(Path(person).stem, Path(reference).stem) for _, (person, reference) in rows]
        else:
            self.pairs = [(stem, stem) for stem in self.files["person"]]
        for person, reference in self.pairs:
            for folder, stem in (("person", person), ("mask", person), ("densepose", person), ("reference", reference)):
                if stem not in self.files[folder]:
                    raise MissingFileError(f"no {folder} image for '{stem}' in {self.root / folder}")

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
