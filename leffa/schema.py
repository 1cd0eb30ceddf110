"""The shard format's names: the manifest, its version, the members of a sample per task, and the
sample-key grammar (build and parse).

Every converter of ``data_prep`` builds its keys here and ``leffa eval`` parses them here; no
other code splits a key. ``data_prep.sample.build_sample`` (writer), ``leffa.data.decode`` and
``leffa.data.preflight`` (readers) take the members of a sample from here. docs/design.md,
"Shard schema", describes the whole format.

Sample members (webdataset names them by the part after the key's first dot), per task
(:data:`TASKS`: ``tryon``, virtual try-on; ``pose``, pose transfer)::

    tgt.jpg        target person, RGB JPEG, native size (H, W)
    ref.jpg        reference, RGB JPEG, any size: the garment (tryon) or the source photo (pose)
    mask.png       L PNG (H, W), 255 = region to generate (the whole image for pose transfer)
    densepose.png  RGB PNG (H, W), the target's pose image (json ``pose_source``: densepose or keypoints)
    json           UTF-8 object: dataset, split, task, category, pairing, tgt_id, ref_id, height, width, ...
    flow.npy       optional float16 (H, W, 2): grid_sample coordinates (x, y) into ref, NaN outside the mask

Shard keys::

    <dataset>_<split>_<pairing>_[<category>_]<target id>[__<reference id>]

- ``dataset`` and ``split``: lower-case letters and digits (no ``_``); ``pairing``: ``paired`` or
  ``unpaired``. These three leading fields are fixed, so the rest can be read without guessing.
- ``category``: only for the datasets of :data:`KEY_CATEGORIES` (DressCode keys carry
  ``upper_body``, ``lower_body`` or ``dresses``); one of a fixed list, so it is read exactly.
- ``target id``: the dataset's own name (file stem) of the target image, which is also the
  name of its ground truth (``vitonhd_test_paired_00010_00`` -> ``00010_00``).
- ``reference id``: the reference's stem, present when the target alone does not name the
  sample: unpaired try-on (the garment) and pose transfer (the source photo).

Ids are file stems in which ``.``, ``/``, ``\\`` and whitespace become ``_`` (webdataset splits
names at the first dot). They may hold ``_`` (``048392_0``), but no ``__`` and no ``_`` at either
end, so the one ``__`` of a key is the separator between target and reference.

Folder keys (``leffa predict`` from a plain folder, see ``leffa.data.predict_folder``) are
``<person id>[__<reference id>]`` with the same id rules; their pairing is ``paired`` without a
reference id and ``unpaired`` with one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from leffa.errors import UserError

__all__ = [
    "MANIFEST_NAME", "SCHEMA_VERSION", "PAIRINGS", "KEY_CATEGORIES", "SEPARATOR",
    "TASKS", "POSE_SOURCES", "REQUIRED_MEMBERS", "OPTIONAL_MEMBERS", "COMMON_MEMBERS", "FLOW_MEMBER",
    "SampleKey", "build_key", "sanitize_id",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
PAIRINGS = ("paired", "unpaired")
KEY_CATEGORIES = {"dresscode": ("upper_body", "lower_body", "dresses")}
SEPARATOR = "__"  # between target id and reference id

TASKS = ("tryon", "pose")
POSE_SOURCES = ("densepose", "keypoints")  # json pose_source: how densepose.png was made
FLOW_MEMBER = "flow.npy"
_IMAGES_AND_META = ("tgt.jpg", "ref.jpg", "mask.png", "densepose.png", "json")
REQUIRED_MEMBERS: dict[str, tuple[str, ...]] = {"tryon": _IMAGES_AND_META, "pose": _IMAGES_AND_META}
OPTIONAL_MEMBERS: dict[str, tuple[str, ...]] = {"tryon": (FLOW_MEMBER,), "pose": (FLOW_MEMBER,)}
# What a reader checks before it has read a sample's json (and so its task): every task's requirement.
COMMON_MEMBERS = tuple(m for m in _IMAGES_AND_META if all(m in REQUIRED_MEMBERS[t] for t in TASKS))

_NAME = re.compile(r"[a-z0-9]+")  # dataset and split
_SHARD_HEAD = re.compile(r"([a-z0-9]+)_([a-z0-9]+)_(paired|unpaired)_(.*)", re.DOTALL)
_NOT_IN_IDS = re.compile(r"[./\\\s]")


def sanitize_id(name: str) -> str:
    """A file stem as a key id: ``.``, ``/``, ``\\`` and whitespace become ``_``."""
    return _NOT_IN_IDS.sub("_", name)


def _id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an id, or None."""
    if not value:
        return "is empty"
    if _NOT_IN_IDS.search(value) or not value.isprintable():
        return "holds '.', '/', '\\', whitespace or a control character"
    if SEPARATOR in value:
        return f"holds '{SEPARATOR}' (the target/reference separator)"
    if value.startswith("_") or value.endswith("_"):
        return "starts or ends with '_'"
    return None


@dataclass(frozen=True)
class SampleKey:
    """One parsed key. ``dataset`` and ``split`` are None for a folder key (see the module doc)."""

    dataset: str | None
    split: str | None
    pairing: str
    target: str
    reference: str | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise UserError(f"ill-formed sample key {self._sketch()!r}: {problem}")

    def _problem(self) -> str | None:
        for name, value in (("target id", self.target), ("reference id", self.reference)):
            if value is not None and (why := _id_problem(value)):
                return f"its {name} {value!r} {why}"
        if self.dataset is None or self.split is None:
            if self.dataset is not None or self.split is not None or self.category is not None:
                return "a folder key has neither dataset, split nor category"
            if self.pairing != ("paired" if self.reference is None else "unpaired"):
                return "a folder key is paired exactly when it has no reference id"
            return None
        if not (_NAME.fullmatch(self.dataset) and _NAME.fullmatch(self.split)):
            return f"dataset {self.dataset!r} and split {self.split!r} must be lower-case letters and digits"
        if self.pairing not in PAIRINGS:
            return f"pairing {self.pairing!r} is not one of {', '.join(PAIRINGS)}"
        categories = KEY_CATEGORIES.get(self.dataset)
        if categories is None and self.category is not None:
            return f"dataset {self.dataset!r} keys carry no category"
        if categories is not None and self.category not in categories:
            return f"category {self.category!r} of a {self.dataset} key is not one of {', '.join(categories)}"
        return None

    def _sketch(self) -> str:
        """The key as built, for error messages (without validation)."""
        head = [] if self.dataset is None else [self.dataset, str(self.split), self.pairing]
        key = "_".join(head + ([self.category] if self.category else []) + [str(self.target)])
        return key if self.reference is None else key + SEPARATOR + self.reference

    @property
    def is_folder_key(self) -> bool:
        return self.dataset is None

    def build(self) -> str:
        """The key string; ``SampleKey.parse(k.build()) == k``."""
        return self._sketch()

    @classmethod
    def folder(cls, person: str, reference: str | None = None) -> SampleKey:
        """The folder key of (person, reference); the reference is dropped when it equals the person."""
        reference = None if reference == person else reference
        return cls(None, None, "paired" if reference is None else "unpaired", person, reference)

    @classmethod
    def parse(cls, key: str) -> SampleKey:
        """A shard key; anything else raises :class:`UserError` naming the key."""
        head = _SHARD_HEAD.fullmatch(key)
        if head is None:
            raise UserError(
                f"ill-formed sample key {key!r}: expected <dataset>_<split>_<pairing>_<target id>"
                f"[{SEPARATOR}<reference id>] with pairing {' or '.join(PAIRINGS)}"
            )
        dataset, split, pairing, rest = head.groups()
        category = None
        for candidate in KEY_CATEGORIES.get(dataset, ()):
            if rest.startswith(candidate + "_"):
                category, rest = candidate, rest[len(candidate) + 1:]
                break
        target, separator, reference = rest.partition(SEPARATOR)
        parsed = cls(dataset, split, pairing, target, reference if separator else None, category)
        if parsed.build() != key:  # e.g. a second '__' inside the reference
            raise UserError(f"ill-formed sample key {key!r}: it does not read back as one key")
        return parsed

    @classmethod
    def parse_folder(cls, key: str) -> SampleKey:
        """A folder key ``<person id>[__<reference id>]``; else :class:`UserError` naming the key."""
        person, separator, reference = key.partition(SEPARATOR)
        parsed = cls.folder(person, reference if separator else None)
        if parsed.build() != key:
            raise UserError(f"ill-formed sample key {key!r}: it does not read back as one key")
        return parsed

    @classmethod
    def parse_any(cls, key: str) -> SampleKey:
        """A shard key when its three leading fields are a shard key's, else a folder key."""
        return cls.parse(key) if _SHARD_HEAD.fullmatch(key) else cls.parse_folder(key)


def build_key(
    dataset: str,
    split: str,
    pairing: str,
    target_id: str,
    reference_id: str | None = None,
    category: str | None = None,
) -> str:
    """The shard key of one sample from the dataset's own file stems (sanitised by :func:`sanitize_id`)."""
    reference = None if reference_id is None else sanitize_id(reference_id)
    return SampleKey(dataset, split, pairing, sanitize_id(target_id), reference, category).build()
