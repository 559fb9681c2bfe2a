"""The label-file index: parsing, name resolution, every bad-input report, and image loading."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from foldkit.data import (
    IMAGE_EXTS,
    DataError,
    label_file,
    load_rgb,
    read_split,
    read_test,
    read_trainval,
    survey_images,
    warn_test_overlap,
)
from foldkit.folds import main as folds_main


def save_png(path: Path, size: tuple[int, int] = (16, 16), mode: str = "RGB", seed: int = 0) -> None:
    """A small random image; ``size`` is (width, height) like PIL."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)


def write_split(data_dir: Path, phase: str, text: str | None, files: list[str]) -> Path:
    """Create ``files`` in the split folder and, unless ``text`` is None, its label file."""
    for i, name in enumerate(files):
        save_png(data_dir / phase / name, seed=i)
    (data_dir / phase).mkdir(parents=True, exist_ok=True)
    path = label_file(data_dir, phase)
    if text is not None:
        path.write_bytes(text.encode("utf-8"))
    return path


def make_data(root: Path, n_train: int = 6, n_validate: int = 4) -> Path:
    """A valid data folder: t<i>.png in train, v<i>.png in validate (alternating labels), 3 test images."""
    data = root / "data"
    train = [f"t{i}.png" for i in range(n_train)]
    validate = [f"v{i}.png" for i in range(n_validate)]
    write_split(data, "train", "".join(f"{n} {i % 2}\n" for i, n in enumerate(train)), train)
    write_split(data, "validate", "".join(f"{n} {i % 2}\n" for i, n in enumerate(validate)), validate)
    write_split(data, "test", None, ["2.png", "10.png", "1.png"])
    return data


# ---------------------------------------------------------------------------------------------- good


def test_read_trainval_columns_order_and_types(tmp_path: Path) -> None:
    df = read_trainval(make_data(tmp_path))
    assert list(df.columns) == ["name", "path", "label", "source"]
    assert df["name"].tolist()[:3] == ["t0.png", "t1.png", "t2.png"]
    assert df["path"].tolist()[-1] == "validate/v3.png"
    assert df["label"].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert df["label"].dtype == np.int64
    assert df["source"].tolist() == ["train"] * 6 + ["validate"] * 4
    assert df.index.tolist() == list(range(10))


def test_blank_lines_trailing_spaces_and_crlf_are_fine(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_split(data, "train", "\r\na.png 1  \r\n\r\n   \r\nb.png\t0\t\r\n\n", ["a.png", "b.png"])
    df = read_split(data, "train")
    assert df["name"].tolist() == ["a.png", "b.png"]
    assert df["label"].tolist() == [1, 0]


def test_jpg_name_resolves_to_png_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_split(
        data,
        "train",
        "69a1d6e71f594437b0dd71b4d59fbd38.jpg 1\nb.jpg 0\n",
        ["69a1d6e71f594437b0dd71b4d59fbd38.png"],
    )
    save_png(data / "train" / "b.jpg")  # the exact name wins when it exists
    save_png(data / "train" / "b.png")
    df = read_split(data, "train")
    assert df["name"].tolist() == ["69a1d6e71f594437b0dd71b4d59fbd38.jpg", "b.jpg"]
    assert df["path"].tolist() == ["train/69a1d6e71f594437b0dd71b4d59fbd38.png", "train/b.jpg"]


def test_name_in_subfolder_inside_split_is_accepted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_split(data, "train", "sub/a.jpg 1\n./b.png 0\n", ["sub/a.png", "b.png"])
    assert read_split(data, "train")["path"].tolist() == ["train/sub/a.png", "train/b.png"]


def test_test_split_names_only_and_with_dummy_labels(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_split(data, "test", "x.png\ny.jpg\n", ["x.png", "y.png"])
    df = read_test(data)
    assert df["name"].tolist() == ["x.png", "y.jpg"]
    assert df["path"].tolist() == ["test/x.png", "test/y.png"]
    assert df["label"].tolist() == [-1, -1]
    assert set(df["source"]) == {"test"}
    label_file(data, "test").write_text("x.png 0\ny.jpg 1\n")
    assert read_test(data)["label"].tolist() == [-1, -1]


def test_test_split_without_label_file_lists_images_in_natural_order(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    (data / "test" / "notes.txt").write_text("not an image")
    df = read_test(data)
    assert df["name"].tolist() == ["1.png", "2.png", "10.png"]
    assert df["path"].tolist() == ["test/1.png", "test/2.png", "test/10.png"]
    assert df["label"].tolist() == [-1, -1, -1]


def test_test_split_without_label_file_or_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test folder not found.*pass --data-dir DIR"):
        read_test(tmp_path / "nothing")
    data = make_data(tmp_path)  # the right data folder, only test/ missing: no --data-dir advice
    shutil.rmtree(data / "test")
    with pytest.raises(DataError, match=rf"not found.*; put the test images in {data / 'test'}/$"):
        read_test(data)


def test_listed_test_names_with_spaces_are_refused_up_front(tmp_path: Path) -> None:
    """Without a test label file the folder is listed; a name with a space could never make a valid
    ``name label`` line, so it is named now, not after hours of predictions."""
    data = make_data(tmp_path)
    save_png(data / "test" / "my face.png")
    with pytest.raises(DataError, match=r"test/my face\.png: names cannot contain spaces"):
        read_test(data)


def test_names_pandas_would_read_as_missing_survive_a_submission(tmp_path: Path) -> None:
    from foldkit.submission import read_submission, write_submission

    names = ["NA", "null", "None", "nan", "a.png"]
    out = write_submission(tmp_path / "p.txt", names, np.array([0, 1, 0, 1, 1]), names)
    assert read_submission(out).name.tolist() == names


# ----------------------------------------------------------------------------------------------- bad

# (label-file text, line number reported, problem text); the train folder holds a.png and b.png.
BAD_TRAIN = {
    "label 2": ("a.png 0\nb.png 2\n", 2, "label must be 0 (real) or 1 (fake) (b.png 2)"),
    "three fields": ("a.png 0\n\na b c\nb.png 1\n", 3, "expected 'name [label]', got 3 fields (a b c)"),
    "duplicate name": ("a.png 0\nb.png 1\na.png 0\n", 3, "duplicate name, first listed on line 1"),
    "missing file": ("a.png 0\nnope.png 1\n", 2, "image not found"),
    "parent dir": ("a.png 0\n../x.png 1\n", 2, "name escapes the data folder"),
    "nested parent dir": ("a.png 0\nb.png 1\nsub/../../x.png 1\n", 3, "name escapes the data folder"),
    "absolute path": ("a.png 0\n{abs} 1\n", 2, "absolute path"),
    "missing label": ("a.png 0\nb.png\n", 2, "missing label"),
    "empty label file": ("\n  \r\n", 1, "empty label file"),
    "same file twice": ("a.png 0\na.jpg 0\n", 2, "resolves to the same file as line 1"),
    "header line": (
        "image label\na.png 0\nb.png 1\n",
        1,
        "label must be 0 (real) or 1 (fake); if this is a header line, delete it: label files have none "
        "(image label)",
    ),
    "bad first line, not a header": ("a.png 2\nb.png 1\n", 1, "label must be 0 (real) or 1 (fake) (a.png 2)"),
    "no extension, not a header": ("a 2\nb.png 1\n", 1, "label must be 0 (real) or 1 (fake) (a 2)"),
}


def _run_cli(data: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = folds_main(["--data-dir", str(data), "--work-dir", str(work)])
    return code, capsys.readouterr().err


def _assert_nothing_written(work: Path) -> None:
    assert not (work / "folds" / "folds.csv").exists()
    assert not (work / "folds" / "folds.json").exists()


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_train_file_names_file_and_line_and_cli_exits_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_data(tmp_path)
    save_png(data / "x.png")  # ../x.png exists: it is rejected for leaving the folder, not for being absent
    text, line, problem = BAD_TRAIN[case]
    path = write_split(
        data, "train", text.format(abs=(data / "train" / "a.png").resolve()), ["a.png", "b.png"]
    )
    with pytest.raises(DataError) as err:
        read_trainval(data)
    assert f"{path}:{line}: {problem}" in str(err.value)
    code, stderr = _run_cli(data, tmp_path / "work", capsys)
    assert code == 2
    assert f"{path}:{line}: {problem}" in stderr
    _assert_nothing_written(tmp_path / "work")


@pytest.mark.parametrize("phase", ["train", "validate"])
def test_missing_label_file_names_expected_path_and_cli_exits_2(
    phase: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_data(tmp_path)
    path = label_file(data, phase)
    path.unlink()
    with pytest.raises(DataError, match="label file not found") as err:
        read_trainval(data)
    assert str(path) in str(err.value)  # no line number exists for a missing file: the path is the news
    code, stderr = _run_cli(data, tmp_path / "work", capsys)
    assert code == 2 and f"{path}: label file not found" in stderr
    _assert_nothing_written(tmp_path / "work")


def test_name_in_train_and_validate_is_reported_with_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_data(tmp_path)
    val = write_split(data, "validate", "v0.png 0\nt2.png 1\n", ["t2.png"])
    with pytest.raises(DataError) as err:
        read_trainval(data)
    assert f"{val}:2: name also listed in {label_file(data, 'train')} line 3 (t2.png)" in str(err.value)
    code, _ = _run_cli(data, tmp_path / "work", capsys)
    assert code == 2
    _assert_nothing_written(tmp_path / "work")


def test_all_problems_of_both_files_are_reported_up_to_20(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    train = write_split(data, "train", "".join(f"t{i}.png 7\n" for i in range(24)) + "t0.png 0\n", [])
    val = write_split(data, "validate", "v0.png 0\nv1.png x\n", [])
    with pytest.raises(DataError) as err:
        read_trainval(data)
    assert len(err.value.problems) == 25
    assert f"{val}:2: label must be 0" in err.value.problems[-1]
    message = str(err.value).splitlines()
    assert message[0] == "the data has 25 problem(s):"
    assert message[1].startswith(f"{train}:1: label must be 0")
    assert message[20].startswith(f"{train}:20: ")
    assert message[-1] == "... and 5 more"
    assert len(message) == 22


def test_test_file_with_three_fields_is_an_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_split(data, "test", "x.png\nx y z\n", ["x.png"])
    with pytest.raises(DataError, match=rf"{path}:2: expected 'name \[label\]', got 3 fields \(x y z\)"):
        read_test(data)


@pytest.mark.parametrize(
    ("phase", "text", "files"),
    [
        ("train", "a.png 0\nmy face.png 1\n", ["a.png", "my face.png"]),  # read as 3 fields
        ("train", "a.png 0\nmy face.png\n", ["a.png"]),  # read as name 'my', label 'face.png'
        ("test", "a.png\nmy face.png\n", ["a.png", "my face.png"]),  # read as name + dummy label
        ("test", "a.png 0\nmy face.png 0\n", ["a.png"]),
    ],
)
def test_name_with_spaces_says_names_cannot_contain_spaces(
    tmp_path: Path, phase: str, text: str, files: list[str]
) -> None:
    data = make_data(tmp_path)
    path = write_split(data, phase, text, files)
    with pytest.raises(DataError) as err:
        read_trainval(data) if phase == "train" else read_test(data)
    assert f"{path}:2: names cannot contain spaces: rename 'my face.png'" in str(err.value)
    assert "a.png" not in str(err.value)


def test_test_names_also_in_train_or_validate_are_warned_with_examples(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_data(tmp_path)
    write_split(data, "test", "t1.png\nnew.png\nv2.png\nt3.png\nt4.png\nt5.png\n", [])
    for name in ("t1.png", "new.png", "v2.png", "t3.png", "t4.png", "t5.png"):
        save_png(data / "test" / name)
    with caplog.at_level(logging.WARNING, logger="foldkit"):
        shared = warn_test_overlap(read_trainval(data), read_test(data))
    assert shared == ["t1.png", "v2.png", "t3.png", "t4.png", "t5.png"]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "5 of 6 test names also appear in train/validate (e.g. t1.png, v2.png, t3.png)" in record.getMessage()
    )
    caplog.clear()
    assert warn_test_overlap(read_trainval(data), read_test(make_data(tmp_path / "other"))) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # INFO may pass after main()


def test_unknown_phase_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="unknown phase"):
        read_split(tmp_path, "holdout")


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("mode", "size"),
    [("RGB", (16, 16)), ("L", (16, 16)), ("RGBA", (16, 16)), ("P", (16, 16)), ("RGB", (128, 96))],
)
def test_load_rgb_converts_modes_and_keeps_size(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    path = tmp_path / "img.png"
    save_png(path, size=size, mode=mode)
    arr = load_rgb(path)
    assert arr.shape == (size[1], size[0], 3)
    assert arr.dtype == np.uint8


def test_wide_grey_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """PIL's convert("RGB") clips 16-bit grey at 255 (a face turns white); both decode paths scale."""
    from foldkit.store import decode_image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32)
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "g16.png")  # mode I;16
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "g32.tif")  # mode I
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "f.tif")  # mode F in 0..1
    expected = np.rint(ramp / 257).astype(np.uint8)
    for name in ("g16.png", "g32.tif", "f.tif"):
        for arr in (load_rgb(tmp_path / name), decode_image(tmp_path / name)):
            assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
            np.testing.assert_allclose(arr[..., 0], expected, atol=1, err_msg=name)
            assert (arr[..., 0] == arr[..., 2]).all()
    from foldkit.neardup import _fingerprint_one  # duplicate grouping decodes the same way

    Image.fromarray(np.flipud(ramp).astype(np.uint16)).save(tmp_path / "g16b.png")
    (a, _), (b, _) = _fingerprint_one(str(tmp_path / "g16.png")), _fingerprint_one(str(tmp_path / "g16b.png"))
    assert a[1] != b[1], "two different 16-bit images are not the same pixels"
    eight = np.arange(256, dtype=np.int32).reshape(16, 16)
    Image.fromarray(eight).save(tmp_path / "i8.tif")  # 8-bit values stored as mode I stay as they are
    assert (load_rgb(tmp_path / "i8.tif")[..., 1] == eight).all()


def test_load_rgb_keeps_pixels(tmp_path: Path) -> None:
    arr = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), arr)


def _index(paths: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"name": paths, "path": paths, "label": 0, "source": "train"})


def test_survey_logs_one_line_for_odd_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_png(tmp_path / "train" / "ok.png", size=(112, 112))
    save_png(tmp_path / "train" / "grey.png", size=(112, 112), mode="L")
    save_png(tmp_path / "train" / "rgba.png", size=(112, 112), mode="RGBA")
    save_png(tmp_path / "train" / "big.png", size=(128, 128))
    df = _index(["train/ok.png", "train/grey.png", "train/rgba.png", "train/big.png"])
    with caplog.at_level(logging.INFO, logger="foldkit"):
        counts = survey_images(tmp_path, df)
    lines = [r.getMessage() for r in caplog.records if r.name == "foldkit.data"]
    assert lines == [
        "3 of 4 checked images are not 112x112 RGB (e.g. train/grey.png: 112x112 L); "
        "they are converted on load"
    ]
    assert counts == {
        "checked": 4,
        "mismatched": 3,
        "sizes": {"112x112": 3, "128x128": 1},
        "modes": {"RGB": 2, "L": 1, "RGBA": 1},
    }


def test_survey_is_silent_for_expected_images_and_samples_evenly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [f"train/{i}.png" for i in range(10)]
    for p in paths:
        save_png(tmp_path / p, size=(112, 112))
    with caplog.at_level(logging.INFO, logger="foldkit"):
        counts = survey_images(tmp_path, _index(paths), max_check=4)
    assert counts["checked"] == 4 and counts["mismatched"] == 0
    assert not [r for r in caplog.records if r.name == "foldkit.data"]


def test_survey_compares_with_the_common_size_not_a_fixed_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [f"train/{i}.png" for i in range(4)]
    for i, p in enumerate(paths):
        save_png(tmp_path / p, size=(32, 32) if i < 3 else (48, 32))
    with caplog.at_level(logging.INFO, logger="foldkit"):
        counts = survey_images(tmp_path, _index(paths))
    assert counts["mismatched"] == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "foldkit.data"]
    assert line.startswith("1 of 4 checked images are not 32x32 RGB (e.g. train/3.png: 48x32 RGB)")


def test_survey_reports_unreadable_images(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png: cannot open image"):
        survey_images(tmp_path, _index(["train/bad.png"]))


def test_image_exts_are_the_documented_ones() -> None:
    assert IMAGE_EXTS == (".png", ".jpg", ".jpeg", ".webp")


def test_line_numbers_count_newlines_only_as_an_editor_does(tmp_path: Path) -> None:
    """str.splitlines() also breaks at U+2028, form feed and \\x1c-\\x1e: a name holding one made
    every later line number one too high against grep -n (line 3's label 2 was reported as line 4)."""
    data = make_data(tmp_path)
    files = ["a.png", "b\u2028c.png", "d.png"]
    path = write_split(data, "train", "a.png 0\nb\u2028c.png 1\nd.png 2\n", files)
    with pytest.raises(DataError) as err:
        read_trainval(data)
    assert f"{path}:3: " in str(err.value) and f"{path}:4" not in str(err.value)
