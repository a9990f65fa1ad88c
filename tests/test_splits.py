"""Class splits a user brings (data.splits), exclusions and the cross-dataset training split.

All checked by `prepare_sampler` (what `metapeft check` runs) on the tiny dataset; no model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metapeft_ray.cli import main
from metapeft_ray.core import storage
from metapeft_ray.core.config import ConfigError, load_config
from metapeft_ray.core.data import DataError
from metapeft_ray.core.episodes import ClassSplits
from metapeft_ray.core.train import prepare_sampler
from tests.conftest import S3_BUCKET
from tests.s3server import S3Server
from tests.tiny import make_tiny_dataset, tiny_overrides

ALL = [
    *("class_00_card", "class_01_transfer", "class_02_pin", "class_03_refund"),
    *("class_04_exchange", "class_05_cash", "class_06_top", "class_07_fee"),
    *("class_08_address", "class_09_account", "class_10_password", "class_11_travel"),
]
TRAIN, VAL, TEST = ALL[:4], ALL[4:8], ALL[8:]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_dataset(tmp_path_factory.mktemp("splits") / "tiny.jsonl"))


def splits(data: str, **extra: object) -> ClassSplits:
    return prepare_sampler(load_config(None, tiny_overrides("unused-backbone", data, **extra))).splits


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def write_folder(path: Path, lists: dict[str, list[str]]) -> str:
    path.mkdir()
    for split, names in lists.items():
        # Blank lines and surrounding spaces, as hand-edited files have them.
        (path / f"labels.{split}.txt").write_text("\n".join(f" {n} " for n in names) + "\n\n")
    return str(path)


def test_tiny_class_names_are_what_these_tests_assume(data: str) -> None:
    s = splits(data)
    assert sorted(s.train + s.val + s.test) == ALL


# -- files a user brings ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_a_splits_file_gives_exactly_the_listed_classes(data: str, tmp_path: Path, fmt: str) -> None:
    mapping = {"train": TRAIN, "valid": VAL, "test": TEST}  # `valid`, as published splits name it
    path = tmp_path / f"splits.{fmt}"
    path.write_text(
        json.dumps(mapping) if fmt == "json" else "\n".join(f"{k}: {v}" for k, v in mapping.items())
    )
    s = splits(data, **{"data.splits": str(path), "data.fold": 2})  # data.fold is not used
    assert (list(s.train), list(s.val), list(s.test)) == (TRAIN, VAL, TEST)
    record = s.to_dict()
    assert record["source"] == str(path) and record["excluded"] == ()
    assert (record["fold"], record["folds"]) == (0, 1)


def test_a_labels_folder_gives_exactly_the_listed_classes(data: str, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "01", {"train": TRAIN, "valid": VAL, "test": TEST})
    s = splits(data, **{"data.splits": folder})
    assert (list(s.train), list(s.val), list(s.test), s.source) == (TRAIN, VAL, TEST, folder)


def test_a_bad_splits_file_lists_every_problem_once(data: str, tmp_path: Path) -> None:
    bad = write_yaml(
        tmp_path / "bad.yaml",
        "train: [class 00 card, class_09_acount, class_01_transfer, class_01_transfer, class_02_pin]\n"
        "val: [class_02_pin, class_04_exchange, class_05_cash, class_06_top]\n"
        "tset: [class_08_address]\n",
    )
    with pytest.raises(DataError) as err:
        splits(data, **{"data.splits": bad})
    assert str(err.value).splitlines() == [
        f"data.splits={bad!r} does not fit the data's 12 classes:",
        "  unknown key 'tset'; expected keys train, val (or valid) and test",
        "  train: 'class 00 card' is not a class of the data (nearest: 'class_00_card'); "
        "fix the name in the splits file",
        "  train: 'class_09_acount' is not a class of the data (nearest: 'class_09_account'); "
        "fix the name in the splits file",
        "  train: 'class_01_transfer' is listed twice; remove the duplicate",
        "  'class_02_pin' is listed in both train and val; keep it in one split",
        "  no test list; expected keys train, val (or valid) and test",
    ]


def test_an_empty_train_list_is_an_error(data: str, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", f"train: []\nval: {VAL}\ntest: {TEST}\n")
    with pytest.raises(DataError, match=r"\n  the train list is empty; list the meta-train classes$"):
        splits(data, **{"data.splits": path})


def test_missing_files_name_what_is_expected(data: str, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "01", {"train": TRAIN})
    with pytest.raises(DataError) as err:
        splits(data, **{"data.splits": folder})
    assert str(err.value) == (
        f"data.splits={folder!r}: the folder lacks labels.valid.txt, labels.test.txt; it needs "
        "labels.train.txt, labels.valid.txt, labels.test.txt (one class per line)"
    )
    with pytest.raises(DataError, match=r"no such file or folder; give a \.yaml/\.yml/\.json file holding"):
        splits(data, **{"data.splits": str(tmp_path / "absent.yaml")})


def test_a_user_split_too_small_for_the_way_is_reported(data: str, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", f"train: {TRAIN}\nval: {VAL[:2]}\ntest: {TEST}\n")
    with pytest.raises(ConfigError) as err:
        splits(data, **{"data.splits": path})
    assert str(err.value).splitlines()[1:] == [
        "  val split has 2 classes, fewer than n_way=3; list more val classes in data.splits, "
        "or lower the way"
    ]


def test_a_user_split_class_with_too_few_examples_is_reported(tmp_path: Path) -> None:
    full = make_tiny_dataset(tmp_path / "full.jsonl").read_text().splitlines()
    rows = [r for r in full if '"class_09_account"' not in r] + [
        r for r in full if '"class_09_account"' in r
    ][:3]
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(rows) + "\n")
    path = write_yaml(tmp_path / "s.yaml", f"train: {TRAIN}\nval: {VAL}\ntest: {TEST}\n")
    with pytest.raises(ConfigError) as err:
        splits(str(short), **{"data.splits": path})  # eval: 1 shot + 3 queries = 4 > 3 examples
    assert str(err.value).splitlines()[1:] == [
        "  test split: k_shot + q_query = 4 exceeds the examples of class(es) class_09_account (3); "
        "lower the shots or q_query, or drop those classes"
    ]


# -- exclusions ---------------------------------------------------------------------------------


def test_exclusions_leave_the_test_classes_of_a_fold_alone(data: str) -> None:
    base = splits(data)
    in_train, in_test = base.train[0], base.test[0]
    glob = "*_" + in_train.split("_", 2)[2]  # e.g. *_card: matches that one class only
    s = splits(data, **{"data.exclude_classes": [glob, in_test]})
    assert s.test == base.test
    assert sorted(s.train + s.val) == sorted(set(base.train + base.val) - {in_train})
    assert (s.exclude_patterns, s.excluded) == ((glob, in_test), (in_train,))


def test_exclusions_apply_to_train_and_val_of_a_splits_file(data: str, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", f"train: {TRAIN}\nval: {VAL}\ntest: {TEST}\n")
    s = splits(
        data, **{"data.splits": path, "data.exclude_classes": ["class_00_*", "class_07_fee", "*_travel"]}
    )
    assert (list(s.train), list(s.val), list(s.test)) == (TRAIN[1:], VAL[:3], TEST)
    assert s.excluded == ("class_00_card", "class_07_fee")


def test_an_exclusion_matching_nothing_suggests_names(data: str) -> None:
    with pytest.raises(DataError) as err:
        splits(data, **{"data.exclude_classes": ["class_1*_travle", "class_02_pin", "zzz"]})
    assert str(err.value).splitlines() == [
        "the class splits cannot be made:",
        "  data.exclude_classes: 'class_1*_travle' matches no class of the data (nearest: "
        "'class_11_travel', 'class_01_transfer'); fix or remove it",
        "  data.exclude_classes: 'zzz' matches no class of the data (no name is close; the data has "
        "12 classes, e.g. 'class_00_card', 'class_01_transfer', 'class_02_pin'); fix or remove it",
    ]


# -- cross-dataset: the test classes come from eval.dataset ------------------------------------------


def test_cross_dataset_keeps_every_class_for_training(data: str) -> None:
    # eval.shots=[20] is impossible on 12 examples a class: the training data's test split is not
    # checked, since nothing is drawn from it.
    s = splits(data, **{"eval.dataset": "hwu64", "eval.shots": [20], "data.fold": 1})
    assert s.test == () and sorted(s.train + s.val) == ALL and (s.fold, s.folds) == (0, 1)
    assert len(s.val) == 5  # data.val_fraction 0.4 of 12
    assert splits(data, **{"eval.dataset": "hwu64", "data.fold": 2}) == s  # no fold is held out


def test_cross_dataset_splits_file_needs_no_test_list(data: str, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", f"train: {TRAIN + TEST}\nval: {VAL}\n")
    s = splits(data, **{"data.splits": path, "eval.dataset": "hwu64"})
    assert (list(s.train), list(s.val), s.test) == (sorted(TRAIN + TEST), VAL, ())
    folder = write_folder(tmp_path / "01", {"train": TRAIN + TEST, "valid": VAL})
    assert splits(data, **{"data.splits": folder, "eval.dataset": "hwu64"}).val == tuple(VAL)
    with pytest.raises(DataError, match="the folder lacks labels.test.txt"):
        splits(data, **{"data.splits": folder})


# -- metapeft check -----------------------------------------------------------------------------------


def test_check_prints_the_split_and_rejects_a_bad_one(
    data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_yaml(tmp_path / "good.yaml", f"train: {TRAIN}\nval: {VAL}\ntest: {TEST}\n")
    extra = {"data.splits": good, "data.exclude_classes": ["class_00_card"]}
    assert main(["check", *tiny_overrides("unused-backbone", data, **extra)]) == 0
    assert (
        capsys.readouterr().out
        == f"ok: {data} splits from {good}: 3 train, 4 val, 4 test classes; 1 excluded\n"
    )

    assert main(["check", *tiny_overrides("unused-backbone", data, **{"eval.dataset": "hwu64"})]) == 0
    assert capsys.readouterr().out == (
        f"ok: {data} all classes (no fold held out): 7 train, 5 val classes; 0 excluded; "
        "test classes from eval.dataset=hwu64\n"
    )

    bad = write_yaml(tmp_path / "bad.yaml", f"train: [class_00_crad]\nval: {VAL}\ntest: {TEST}\n")
    assert main(["check", *tiny_overrides("unused-backbone", data, **{"data.splits": bad})]) == 2
    assert capsys.readouterr().err == (
        f"metapeft check: error: data.splits={bad!r} does not fit the data's 12 classes:\n"
        "  train: 'class_00_crad' is not a class of the data (nearest: 'class_00_card'); "
        "fix the name in the splits file\n"
    )


def test_splits_from_s3_file_and_folder(data: str, tmp_path: Path, s3_env: S3Server) -> None:
    uri = f"s3://{S3_BUCKET}/splits/s.yaml"
    storage.write_text(uri, f"train: {TRAIN}\nval: {VAL}\ntest: {TEST}\n")
    assert splits(data, **{"data.splits": uri}).to_dict()["source"] == uri
    folder = write_folder(tmp_path / "01", {"train": TRAIN, "valid": VAL, "test": TEST})
    storage.upload_dir(Path(folder), f"s3://{S3_BUCKET}/splits/01")
    s = splits(data, **{"data.splits": f"s3://{S3_BUCKET}/splits/01/"})
    assert (list(s.train), list(s.val), list(s.test)) == (TRAIN, VAL, TEST)
    with pytest.raises(DataError, match="no such file or folder"):
        splits(data, **{"data.splits": f"s3://{S3_BUCKET}/splits/absent.yaml"})
