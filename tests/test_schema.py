"""leffa.schema: the sample-key grammar on the keys every converter builds from the tiny raw datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from raw_datasets import make_vitonhd
from raw_deepfashion import make_deepfashion
from raw_dresscode import make_dresscode

from data_prep.__main__ import build_parser
from data_prep.dresscode import CATEGORIES as DRESSCODE_CATEGORIES
from data_prep.registry import get_converter
from data_prep.synthetic_shards import synthetic_sample
from leffa.errors import UserError
from leffa.schema import (
    KEY_CATEGORIES,
    OPTIONAL_MEMBERS,
    REQUIRED_MEMBERS,
    TASKS,
    SampleKey,
    build_key,
)


def converter_keys(dataset: str, src: Path | None, tmp_path: Path) -> list[tuple[object, str]]:
    """(spec, key) of every sample the converter would write, both splits (reads pair files only)."""
    argv = [dataset, "--out", str(tmp_path / "unused")] + ([] if src is None else ["--src", str(src)])
    args = build_parser().parse_args(argv + (["--count", "3"] if dataset == "synthetic" else []))
    converter = get_converter(dataset)
    return [(spec, spec.key) for split in converter.SPLITS for spec in converter.list_samples(args, split)]


@pytest.fixture
def real_keys(tmp_path) -> dict[str, list[tuple[object, str]]]:
    return {
        "vitonhd": converter_keys("vitonhd", make_vitonhd(tmp_path / "VITON-HD"), tmp_path),
        "dresscode": converter_keys("dresscode", make_dresscode(tmp_path / "DressCode"), tmp_path),
        "deepfashion": converter_keys("deepfashion", make_deepfashion(tmp_path / "fashion"), tmp_path),
        "synthetic": converter_keys("synthetic", None, tmp_path),
    }


def test_every_converter_key_round_trips(real_keys):
    for dataset, pairs in real_keys.items():
        assert pairs, dataset
        for spec, key in pairs:
            parsed = SampleKey.parse(key)
            assert parsed.build() == key
            assert SampleKey.parse(parsed.build()) == parsed
            assert SampleKey.parse_any(key) == parsed
            assert (parsed.dataset, parsed.split, parsed.pairing) == (dataset, spec.split, spec.pairing)


def test_parsed_fields_are_the_dataset_ids(real_keys):
    vitonhd = {SampleKey.parse(k) for _, k in real_keys["vitonhd"]}
    assert SampleKey("vitonhd", "test", "unpaired", "00010_00", "00011_00") in vitonhd
    assert SampleKey("vitonhd", "test", "paired", "00010_00") in vitonhd
    for spec, key in real_keys["vitonhd"]:
        parsed = SampleKey.parse(key)
        assert parsed.target == Path(spec.person).stem  # ground truth is test/image/<target>.jpg
        assert parsed.reference == (Path(spec.cloth).stem if spec.pairing == "unpaired" else None)

    for spec, key in real_keys["dresscode"]:  # ids with '_' (048392_0) and categories with '_'
        parsed = SampleKey.parse(key)
        assert (parsed.category, parsed.target) == (spec.category, Path(spec.person).stem)
        assert parsed.reference == (Path(spec.cloth).stem if spec.pairing == "unpaired" else None)
    assert SampleKey.parse("dresscode_test_unpaired_upper_body_048392_0__048393_1") == SampleKey(
        "dresscode", "test", "unpaired", "048392_0", "048393_1", "upper_body")

    for spec, key in real_keys["deepfashion"]:  # pose transfer: the target is 'to', the reference 'from'
        parsed = SampleKey.parse(key)
        assert (parsed.target, parsed.reference) == (Path(spec.tgt_name).stem, Path(spec.ref_name).stem)
        assert "_" in parsed.target and "_" in parsed.reference

    assert [SampleKey.parse(k).target for s, k in real_keys["synthetic"] if s.split == "test"] == [
        "000000", "000001", "000002"]


def test_build_key_is_the_converters_format():
    key = build_key("vitonhd", "test", "unpaired", "00010_00", "00011_00")
    assert key == "vitonhd_test_unpaired_00010_00__00011_00"
    assert build_key("dresscode", "train", "paired", "000001_0", category="upper_body") == (
        "dresscode_train_paired_upper_body_000001_0")
    assert build_key("deepfashion", "test", "paired", "a b.c", "d/e") == "deepfashion_test_paired_a_b_c__d_e"


@pytest.mark.parametrize("key", [
    "vitonhd_test_paired_", "vitonhd_test_maybe_00010_00", "vitonhd_test_paired_00010_00__",
    "vitonhd_test_paired_00010_00___00011_00", "vitonhd_test_unpaired_a__b__c", "vitonhd_test_paired_x.y",
    "vitonhd_test_paired_../../etc", "VITONHD_test_paired_00010_00", "dresscode_test_paired_048392_0",
    "synthetic_test_paired_skirts_000001_0__x_", "vitonhd_test_paired_a\nb", "vitonhd_test",
])
def test_ill_formed_keys_are_refused_naming_the_key(key):
    with pytest.raises(UserError, match="ill-formed sample key") as error:
        SampleKey.parse(key)
    assert repr(key) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("ids", [("a__b", None), ("a_", None), ("x", "_y"), ("a./b", None), ("", None)])
def test_build_refuses_ids_that_would_not_parse_back(ids):
    with pytest.raises(UserError, match="ill-formed sample key"):
        build_key("vitonhd", "test", "unpaired", *ids)


def test_folder_keys():
    assert SampleKey.parse_any("00010_00") == SampleKey(None, None, "paired", "00010_00")
    assert SampleKey.parse_any("p_1__r_2") == SampleKey.folder("p_1", "r_2")
    assert SampleKey.folder("p_1", "r_2").build() == "p_1__r_2" and SampleKey.folder("p", "p").build() == "p"
    assert SampleKey.parse_any("p_1__r_2").pairing == "unpaired"
    with pytest.raises(UserError, match="'p___r'"):
        SampleKey.parse_any("p___r")


def test_categories_are_those_of_the_converter():
    assert KEY_CATEGORIES["dresscode"] == DRESSCODE_CATEGORIES


def test_every_converter_sample_holds_its_tasks_members(real_keys):
    """One sample per converter (try-on and pose transfer): the members of leffa.schema, no other."""
    tasks = set()
    for dataset, pairs in real_keys.items():
        sample = get_converter(dataset).load_sample(pairs[0][0])
        task = json.loads(sample["json"])["task"]
        members = set(sample) - {"__key__"}
        assert set(REQUIRED_MEMBERS[task]) <= members <= set(REQUIRED_MEMBERS[task]) | set(OPTIONAL_MEMBERS[task])
        tasks.add(task)
    assert tasks == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_the_reader_refuses_a_sample_without_a_required_member(task):
    from leffa.data.decode import CorruptSample, decode_sample

    sample = synthetic_sample(0, 16, 12)
    sample["json"] = json.dumps({**json.loads(sample["json"]), "task": task}).encode()
    decode_sample(dict(sample))
    for member in REQUIRED_MEMBERS[task]:
        with pytest.raises(CorruptSample, match=re.escape(member)):
            decode_sample({k: v for k, v in sample.items() if k != member})
    for member in OPTIONAL_MEMBERS[task]:
        decode_sample({k: v for k, v in sample.items() if k != member})
