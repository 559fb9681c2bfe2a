"""Fold assignment: stratified, leak-free under regex and near-duplicate groups, reproducible, reused."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import foldkit
from foldkit import folds as folds_mod
from foldkit.data import label_file, read_trainval
from foldkit.folds import (
    FOLD_COLUMNS,
    assert_no_leak,
    ensure_folds,
    fold_table,
    folds_hash,
    format_fold_table,
    load_folds,
    main,
    make_folds,
    near_dup_pairs,
    phash_images,
    write_folds,
)
from foldkit.io import FoldkitError

SETTINGS = {"k": 5, "seed": 42, "group_regex": None, "near_dup": False, "hamming": 6}


def synthetic_index(
    n: int = 3000, fake_ratio: float = 0.3, n_subjects: int = 300, seed: int = 0
) -> pd.DataFrame:
    """An index without images: names ``S<subject>_<i>.png``, labels drawn per row."""
    rng = np.random.default_rng(seed)
    subjects = rng.integers(0, n_subjects, n)
    names = [f"S{s}_{i}.png" for i, s in enumerate(subjects)]
    return pd.DataFrame(
        {
            "name": names,
            "path": [f"train/{x}" for x in names],
            "label": (rng.random(n) < fake_ratio).astype(np.int64),
            "source": np.where(np.arange(n) < n * 3 // 4, "train", "validate"),
        }
    )


def assert_groups_whole(df: pd.DataFrame, key: pd.Series) -> None:
    """Every value of ``key`` (e.g. a subject) lies in exactly one fold."""
    assert (df.groupby(key)["fold"].nunique() == 1).all()


def assert_stratified(df: pd.DataFrame, tolerance: float = 0.02) -> None:
    overall = df["label"].mean()
    ratios = df.groupby("fold")["label"].mean()
    assert (ratios - overall).abs().max() <= tolerance, ratios.to_dict()


# ---------------------------------------------------------------------------------------------- folds


def test_stratified_without_groups() -> None:
    df = make_folds(synthetic_index(), Path("."))
    assert list(df.columns) == FOLD_COLUMNS
    assert sorted(df["fold"].unique()) == [0, 1, 2, 3, 4]
    assert df["fold"].value_counts().max() - df["fold"].value_counts().min() <= 1
    assert_stratified(df, tolerance=0.005)
    assert df["group"].is_unique and df["group"].iloc[7] == "g7"


def test_regex_groups_are_leak_free_and_stratified(caplog: pytest.LogCaptureFixture) -> None:
    index = synthetic_index()
    index.loc[[5, 9], "name"] = ["odd_one.png", "odd_two.png"]
    with caplog.at_level(logging.WARNING, logger="foldkit"):
        df = make_folds(index, Path("."), group_regex=r"S\d+")
    assert_groups_whole(df, df["name"].str.extract(r"(S\d+)")[0].fillna(df["name"]))
    assert_stratified(df)
    assert df.loc[0, "group"] == df.loc[0, "name"].split("_")[0]  # the regex key names its group
    assert df.loc[[5, 9], "group"].tolist() == ["g5", "g9"]
    assert any("2 of 3000 names do not match" in r.getMessage() for r in caplog.records)


def test_empty_regex_match_counts_as_no_match() -> None:
    index = synthetic_index(n=200)
    index.loc[3, "name"] = "plain.png"
    df = make_folds(index, Path("."), group_regex=r"S?\d*")  # matches "" at the start of "plain.png"
    assert df.loc[3, "group"] == "g3"
    assert df.loc[0, "group"] == index.loc[0, "name"].split("_")[0]


def test_bundled_groups_stay_whole_and_stratified(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many groups take StratifiedGroupKFold slowly; above the limit small groups are bundled first.
    monkeypatch.setattr(folds_mod, "_MAX_SGKF_GROUPS", 200)
    index = synthetic_index(n=4000, n_subjects=50)
    index.loc[index.index % 2 == 0, "name"] = [f"x{i}.png" for i in range(2000)]  # 2000 singletons
    df = make_folds(index, Path("."), group_regex=r"S\d+")
    assert df["group"].nunique() == 2050
    assert_groups_whole(df, df["group"])
    assert_stratified(df)


def test_same_settings_same_folds_and_seed_matters() -> None:
    index = synthetic_index()
    a = make_folds(index, Path("."), group_regex=r"S\d+")
    b = make_folds(index, Path("."), group_regex=r"S\d+")
    c = make_folds(index, Path("."), group_regex=r"S\d+", seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert not a["fold"].equals(c["fold"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 1}, "at least 2"),
        ({"group_regex": "S("}, "not a valid regular expression"),
        ({"hamming": 40}, "0..31"),
    ],
)
def test_bad_settings_are_foldkit_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(FoldkitError, match=message):
        make_folds(synthetic_index(n=100), Path("."), **kwargs)


def test_too_few_groups_for_k_is_a_foldkit_error() -> None:
    with pytest.raises(FoldkitError, match="cannot make 5 folds"):
        make_folds(synthetic_index(n=200, n_subjects=3), Path("."), group_regex=r"S\d+")


def test_assert_no_leak_names_group_and_folds() -> None:
    df = make_folds(synthetic_index(n=100), Path("."))
    assert_no_leak(df)
    df.loc[[3, 4], "group"] = "S99"
    df.loc[[3, 4], "fold"] = [1, 3]
    with pytest.raises(FoldkitError, match=r"group 'S99' is in folds 1, 3"):
        assert_no_leak(df)


# ------------------------------------------------------------------------------------------ near-dup


def test_near_dup_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, d, replace=False))) for d in range(9)]
    near = np.array([base[i] ^ flips[i % 9] for i in range(60)], dtype=np.uint64)  # distances 0..8
    hashes = np.concatenate([base, near])
    a, b = near_dup_pairs(hashes, hamming=6)
    found = {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)}
    xor = hashes[:, None] ^ hashes[None, :]
    dist = np.array([[bin(int(v)).count("1") for v in row] for row in xor])
    expected = {(i, j) for i, j in zip(*np.nonzero(dist <= 6), strict=True) if i < j}
    assert found == expected
    assert len(expected) >= 40


def _smooth_image(rng: np.random.Generator) -> Image.Image:
    """A random low-frequency image: distinct ones sit far apart in phash space (>10 bits)."""
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((48, 48), Image.BICUBIC)


def _noisy_jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(image).astype(float) + rng.normal(0, 4, (48, 48, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    buf.seek(0)
    return Image.open(buf)


def make_dup_data(root: Path, n: int = 40) -> Path:
    """``n`` distinct faces split train/validate, plus copies: ``a`` exact (other split), ``b`` noisy JPEG."""
    rng = np.random.default_rng(1)
    data = root / "data"
    for phase in ("train", "validate"):
        (data / phase).mkdir(parents=True)
    images = [_smooth_image(rng) for _ in range(n)]
    rows = {"train": [], "validate": []}
    for i, im in enumerate(images):
        phase = "train" if i < n * 3 // 4 else "validate"
        im.save(data / phase / f"img{i}.png")
        rows[phase].append(f"img{i}.png {i % 2}")
    (data / "validate" / "copy_a.png").write_bytes((data / "train" / "img0.png").read_bytes())
    rows["validate"].append("copy_a.png 0")
    _noisy_jpeg(images[1], rng).save(data / "train" / "copy_b.jpg", quality=95)
    rows["train"].append("copy_b.jpg 1")
    for phase, lines in rows.items():
        label_file(data, phase).write_text("\n".join(lines) + "\n")
    return data


def test_near_duplicates_share_group_and_fold(tmp_path: Path) -> None:
    data = make_dup_data(tmp_path)
    index = read_trainval(data)
    df = make_folds(index, data, near_dup=True, workers=1).set_index("name")
    assert df.loc["copy_a.png", "group"] == df.loc["img0.png", "group"] == "g0"
    assert df.loc["copy_b.jpg", "group"] == df.loc["img1.png", "group"] == "g1"
    assert df.loc["copy_a.png", "fold"] == df.loc["img0.png", "fold"]
    assert df.loc["copy_b.jpg", "fold"] == df.loc["img1.png", "fold"]
    assert df["group"].nunique() == 40  # distinct images stay apart
    plain = make_folds(index, data).set_index("name")
    assert plain["group"].nunique() == 42


def test_regex_and_near_dup_groups_combine(tmp_path: Path) -> None:
    data = make_dup_data(tmp_path)
    index = read_trainval(data)
    df = make_folds(index, data, group_regex=r"img[0-4]\b|img1\d", near_dup=True, workers=1).set_index("name")
    # img1 and its noisy copy copy_b share one key "img1"; the exact copy of img0 joins key "img0".
    assert df.loc["copy_b.jpg", "group"] == "img1"
    assert df.loc["copy_a.png", "group"] == "img0"
    assert df.loc[["img10.png", "img11.png"], "group"].tolist() == ["img10", "img11"]
    assert_no_leak(df.reset_index())


def test_phash_in_parallel_matches_serial(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    paths = []
    for i in range(300):  # over the threshold where a process pool is used
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
        paths.append(str(path))
    np.testing.assert_array_equal(phash_images(paths, workers=2), phash_images(paths, workers=1))


def test_unreadable_image_fails_hashing(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(FoldkitError, match="cannot read image for hashing"):
        phash_images([str(tmp_path / "bad.png")], workers=1)


# ---------------------------------------------------------------------------------------------- artifacts


def make_data(root: Path, n_train: int = 30, n_validate: int = 10) -> Path:
    """Tiny images named S<subject>_<i>.png with alternating labels."""
    data = root / "data"
    for phase, n in (("train", n_train), ("validate", n_validate)):
        (data / phase).mkdir(parents=True)
        lines = []
        for i in range(n):
            name = f"S{i % 7}_{phase}{i}.png"
            Image.new("RGB", (16, 16), (i * 5, 0, 0)).save(data / phase / name)
            lines.append(f"{name} {i % 2}")
        label_file(data, phase).write_text("\n".join(lines) + "\n")
    return data


def test_write_then_load_round_trip_and_hashes(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    df = make_folds(read_trainval(data), data, group_regex=r"S\d+")
    meta = write_folds(df, tmp_path / "w", {**SETTINGS, "group_regex": r"S\d+"})
    csv = tmp_path / "w" / "folds" / "folds.csv"
    assert csv.read_text().splitlines()[0] == "name,path,label,source,group,fold"
    assert meta["hash"] == hashlib.sha256(csv.read_bytes()).hexdigest() == folds_hash(tmp_path / "w")
    assert list(meta) == ["k", "seed", "group_regex", "near_dup", "hamming", "n", "data_hash", "hash"]
    assert meta["n"] == 40
    loaded, loaded_meta = load_folds(tmp_path / "w")
    pd.testing.assert_frame_equal(loaded, df, check_dtype=False)
    assert loaded_meta == meta


def test_load_folds_missing_or_tampered(tmp_path: Path) -> None:
    with pytest.raises(FoldkitError, match=re.escape(str(tmp_path / "w" / "folds" / "folds.json"))):
        load_folds(tmp_path / "w")
    df = make_folds(synthetic_index(n=100), Path("."))
    write_folds(df, tmp_path / "w", SETTINGS)
    csv = tmp_path / "w" / "folds" / "folds.csv"
    csv.write_text(csv.read_text().replace(",0\n", ",1\n", 1))
    with pytest.raises(FoldkitError, match="does not match the hash"):
        load_folds(tmp_path / "w")


def test_write_folds_refuses_a_leak(tmp_path: Path) -> None:
    df = make_folds(synthetic_index(n=100), Path("."))
    df.loc[[0, 1], "group"] = "same"
    df.loc[[0, 1], "fold"] = [0, 1]
    with pytest.raises(FoldkitError, match="fold leak"):
        write_folds(df, tmp_path / "w", SETTINGS)
    assert not (tmp_path / "w" / "folds").exists()


def test_rerun_gives_identical_bytes(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    ensure_folds(data, tmp_path / "a", group_regex=r"S\d+")
    ensure_folds(data, tmp_path / "b", group_regex=r"S\d+", force=True)
    for name in ("folds.csv", "folds.json"):
        assert (tmp_path / "a" / "folds" / name).read_bytes() == (
            tmp_path / "b" / "folds" / name
        ).read_bytes()


def test_ensure_folds_reuses_until_data_or_settings_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, work = make_data(tmp_path), tmp_path / "w"
    csv = work / "folds" / "folds.csv"
    with caplog.at_level(logging.INFO, logger="foldkit"):
        _, meta = ensure_folds(data, work, group_regex=r"S\d+")
        os.utime(csv, ns=(0, 0))  # a rewrite would show as a new mtime
        df, again = ensure_folds(data, work, group_regex=r"S\d+")
        assert again == meta and csv.stat().st_mtime_ns == 0
        assert "reusing" in caplog.records[-1].getMessage()
        assert len(df) == 40

        ensure_folds(data, work, group_regex=r"S\d+", hamming=3)  # unused without --near-dup: reused
        assert csv.stat().st_mtime_ns == 0

        _, changed = ensure_folds(data, work, group_regex=r"S\d+", k=4)
        assert changed["k"] == 4
        assert any("settings changed: k 5 -> 4" in r.getMessage() for r in caplog.records)

        with label_file(data, "validate").open("a") as fh:
            fh.write("S1_new.png 1\n")
        Image.new("RGB", (16, 16)).save(data / "validate" / "S1_new.png")
        _, rebuilt = ensure_folds(data, work, group_regex=r"S\d+", k=4)
    assert rebuilt["n"] == 41 and rebuilt["data_hash"] != changed["data_hash"]
    assert any("the data changed" in r.getMessage() for r in caplog.records)


def test_fold_table_counts_and_total() -> None:
    df = make_folds(synthetic_index(n=1000), Path("."), group_regex=r"S\d+")
    table = fold_table(df)
    assert list(table.columns) == ["n", "fakes", "fake_ratio", "n_train", "n_validate", "groups"]
    assert table.index.tolist() == [0, 1, 2, 3, 4, "total"]
    assert table.loc["total", "n"] == 1000 == table["n"].iloc[:5].sum()
    assert table.loc["total", "groups"] == df["group"].nunique()
    assert table.loc["total", "fakes"] == df["label"].sum()
    text = format_fold_table(df).splitlines()
    assert text[0].split() == ["fold", *table.columns] and text[-1].split()[0] == "total"


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_prints_table_and_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, work = make_data(tmp_path), tmp_path / "w"
    assert main(["--data-dir", str(data), "--work-dir", str(work), "--k", "3", "--group-regex", r"S\d+"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["fold", "n", "fakes", "fake_ratio", "n_train", "n_validate", "groups"]
    assert out.splitlines()[4].split()[:2] == ["total", "40"]
    meta = json.loads((work / "folds" / "folds.json").read_text())
    assert meta["k"] == 3 and meta["group_regex"] == r"S\d+" and meta["hash"] in out
    df, _ = load_folds(work)
    assert_groups_whole(df, df["group"])
    assert df["group"].nunique() == 7


def test_cli_module_exit_status(tmp_path: Path) -> None:
    data, work = make_data(tmp_path), tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": str(Path(foldkit.__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "foldkit.folds", "--data-dir", str(data), "--work-dir", str(work), "--force"]
    ensure_folds(data, work)
    before = {p.name: p.read_bytes() for p in (work / "folds").iterdir()}
    label_file(data, "train").write_text("S0_train0.png 2\n")
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert f"{label_file(data, 'train')}:1: label must be 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert {p.name: p.read_bytes() for p in (work / "folds").iterdir()} == before  # nothing written
