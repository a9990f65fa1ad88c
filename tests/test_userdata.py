"""User data that just works: Excel's BOM, real line numbers, every error names its source, and
`metapeft check` catching what `train` would reject (output dir, placement, backbone) offline.

Fast: the tiny dataset and the tiny 2-layer BERT's config only; no weights, no Ray, no network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from metapeft_ray.cli import main
from metapeft_ray.core import data as data_mod
from metapeft_ray.core.data import DataError, load_dataset
from metapeft_ray.core.episodes import ClassSplits
from tests.tiny import tiny_overrides

# -- reading files ------------------------------------------------------------------------------


def test_a_csv_saved_by_excel_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes('text,label\r\nlost my card,card\r\n"a, b",fee\r\n'.encode("utf-8-sig"))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    data = load_dataset(str(path))
    assert (data.texts, data.labels) == (("lost my card", "a, b"), ("card", "fee"))
    # the same for a .tsv and a .jsonl, and an upper-case suffix
    (tmp_path / "b.TSV").write_bytes("text\tlabel\nhi\tx\n".encode("utf-8-sig"))
    (tmp_path / "c.jsonl").write_bytes('{"text": "yo", "label": "y"}\n'.encode("utf-8-sig"))
    assert load_dataset(str(tmp_path / "b.TSV")).labels == ("x",)
    assert load_dataset(str(tmp_path / "c.jsonl")).texts == ("yo",)


def test_a_bad_jsonl_line_is_named_by_its_line_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine", "label": "x"})
    path.write_text(f'{good}\n\n{{"text": "oops", "label" "x"}}\n{good}\n')
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    assert str(err.value) == (
        f"{path}: cannot read it (line 3, column 26: Expecting ':' delimiter); "
        "each line must be one JSON object"
    )

    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(DataError, match=rf"^{path}: line 2 is a JSON list, not an object"):
        load_dataset(str(path))


def test_an_empty_csv_field_names_the_file_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text('text,label\n"two\nlines",x\nok,y\n,z\n')  # row 3 starts on line 5
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    assert str(err.value) == (
        f"{path}: row 3 has an empty 'text' or 'label' (line 5); fill it in or remove the row"
    )


def test_a_folder_names_the_file_that_is_wrong_and_skips_empty_parts(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.csv").write_text("text,label\nhi,x\n")
    (folder / "b.csv").write_text("")  # an empty part is skipped
    (folder / "c.csv").write_text("text,intent\nyo,y\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(folder))
    assert str(err.value).startswith(
        f"{folder / 'c.csv'}: missing column(s) ['label']; found ['intent', 'text']"
    )
    (folder / "c.csv").write_text("text,label\nyo,y\n")
    data = load_dataset(str(folder))
    assert (data.name, data.texts, data.labels) == (str(folder), ("hi", "yo"), ("x", "y"))


def test_a_non_utf8_file_says_how_to_save_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{path}: cannot read it \(.*\); save it as UTF-8"):
        load_dataset(str(path))


def test_an_s3_file_error_names_the_uri_not_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache" / "bucket" / "data.csv"
    cache.parent.mkdir(parents=True)
    cache.write_text("sentence,label\nhi,x\n")
    monkeypatch.setattr("metapeft_ray.core.storage.fetch_to_local", lambda uri, cache_dir: cache)
    with pytest.raises(DataError) as err:
        data_mod.load_s3("s3://bucket/data.csv", "text", "label")
    assert str(err.value).startswith("s3://bucket/data.csv: missing column(s) ['text']")


def test_too_few_classes_for_the_folds_names_the_dataset() -> None:
    with pytest.raises(DataError) as err:
        ClassSplits.make(list("abcd"), folds=3, fold=0, split_seed=0, val_fraction=0.2, name="my.csv")
    assert str(err.value) == (
        "my.csv has 4 classes, too few for data.folds=3 folds plus train and val classes "
        "(needs at least 5); lower data.folds"
    )
    with pytest.raises(DataError, match="^the data has 4 classes"):  # the default name
        ClassSplits.make(list("abcd"), folds=3, fold=0, split_seed=0, val_fraction=0.2)


# -- metapeft check -----------------------------------------------------------------------------


def _check(capsys: pytest.CaptureFixture[str], backbone: str, data: str, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["check", *tiny_overrides(backbone, data), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_passes_a_good_config_and_reports_the_adapter(
    tiny_backbone: str, tiny_dataset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _check(capsys, tiny_backbone, tiny_dataset)
    assert code == 0 and "error" not in err and "note" not in err
    # LoRA rank 4 on query and value (32 x 32) of 2 layers: 2 * 2 * (4 * 32 + 32 * 4)
    assert out.splitlines() == [
        f"ok: {tiny_dataset} fold 0/3: 5 train, 3 val, 4 test classes; 0 excluded",
        f"ok: peft.method=lora, peft.placement=attn_qv peft.layers=all fits model.backbone={tiny_backbone} "
        "(bert, 2 layers): 1,024 adapter parameters",
    ]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["run.output_dir=ftp://host/runs"],
            "run.output_dir='ftp://host/runs': unsupported storage scheme 'ftp://'; use a local path, "
            "file:// or s3://BUCKET/prefix",
        ),
        (["run.output_dir=s3://"], "run.output_dir='s3://': the URI names no bucket; use s3://BUCKET/prefix"),
        (
            ["run.output_dir=s3:///runs"],
            "run.output_dir='s3:///runs': the URI names no bucket; use s3://BUCKET/prefix",
        ),
        (
            ["peft.layers=top_99"],
            "peft.layers='top_99': the backbone has 2 layers, so N must be in 1..2; lower N or use "
            "peft.layers=all",
        ),
        (
            ["peft.placement=custom", "peft.target_modules=[nope]"],
            "peft placement 'custom' (layers='all', target_modules=['nope']) matches no module of "
            "this backbone; nearest linear modules: ",
        ),
    ],
    ids=["ftp-output-dir", "s3-no-bucket", "s3-empty-bucket", "layers-out-of-range", "custom-nothing"],
)
def test_check_rejects_what_train_would(
    tiny_backbone: str,
    tiny_dataset: str,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    expected: str,
) -> None:
    code, out, err = _check(capsys, tiny_backbone, tiny_dataset, *overrides)
    assert (code, out) == (2, "")
    assert err.startswith(f"metapeft check: error: {expected}")
    assert err.count("\n") == 1, "one line"


def test_check_rejects_a_missing_backbone_dir(
    tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "models" / "nope")
    code, out, err = _check(capsys, missing, tiny_dataset)
    assert (code, out) == (2, "")
    assert err == (
        f"metapeft check: error: model.backbone={missing!r}: no such model directory ({missing}); use "
        "'all-MiniLM-L6-v2' (packaged, offline), a local Hugging Face model directory or a hub id\n"
    )


def test_check_rejects_a_dir_without_a_model_config(
    tiny_backbone: str, tiny_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_backbone, broken)
    (broken / "config.json").unlink()
    code, _, err = _check(capsys, str(broken), tiny_dataset)
    assert code == 2
    assert err.startswith(f"metapeft check: error: model.backbone={str(broken)!r}: cannot read its config (")


def test_check_notes_a_hub_id_it_cannot_resolve_offline(
    tiny_dataset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _check(capsys, "no-such-org/no-such-model-xyz", tiny_dataset)
    assert code == 0
    assert out.startswith(f"ok: {tiny_dataset} fold 0/3") and len(out.splitlines()) == 1
    assert err == (
        "metapeft check: note: model.backbone='no-such-org/no-such-model-xyz' is not a local directory "
        "nor in the Hugging Face cache: the adapter placement was not checked (offline); train "
        "downloads it as a hub id\n"
    )
