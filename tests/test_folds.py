"""Fold assignment: stratified, leak-free under regex and near-duplicate groups, reproducible, reused.

The near-duplicate tests follow the policy of docs/DESIGN-notes.md: identical pixels always join,
pHash candidates join only after the thumbnail check, never across two regex groups, never into a
keyless group over the cap; groups too large for balanced folds are errors that name their cause.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import foldkit
from foldkit import folds as folds_mod
from foldkit.config import MAX_HAMMING, ConfigError, load_config, parse_override
from foldkit.data import label_file, read_trainval
from foldkit.folds import (
    FOLD_COLUMNS,
    SETTING_KEYS,
    assert_no_leak,
    build_parser,
    check_group_regex,
    ensure_folds,
    fold_settings,
    fold_table,
    folds_hash,
    format_fold_table,
    load_folds,
    main,
    make_folds,
    write_folds,
)
from foldkit.io import FoldkitError
from foldkit.neardup import THUMB_SIDE, Fingerprints, fingerprint_images, near_dup_pairs
from foldkit.synthetic import generate

SETTINGS = {
    "k": 5,
    "seed": 42,
    "group_regex": None,
    "near_dup": False,
    "hamming": 6,
    "near_dup_min_corr": 0.99,
    "near_dup_max_group": 16,
}
DEFAULT_YAML = Path(foldkit.PROJECT_ROOT) / "configs" / "default.yaml"


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


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


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
    assert "2 of 3000 names do not match" in messages(caplog)


def test_empty_regex_match_counts_as_no_match() -> None:
    index = synthetic_index(n=200)
    index.loc[3, "name"] = "plain.png"
    df = make_folds(index, Path("."), group_regex=r"S?\d*")  # matches "" at the start of "plain.png"
    assert df.loc[3, "group"] == "g3"
    assert df.loc[0, "group"] == index.loc[0, "name"].split("_")[0]


def test_regex_matching_under_90_percent_is_an_error_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    index = synthetic_index(n=1000)
    md5 = [hashlib.md5(str(i).encode()).hexdigest() + ".jpg" for i in range(150)]
    index.loc[: len(md5) - 1, "name"] = md5  # 85% keep a subject id: under the bar
    with pytest.raises(FoldkitError) as err:
        make_folds(index, Path("."), group_regex=r"S\d+")
    text = str(err.value)
    assert "matches only 850 of 1000 names (85.0%" in text and md5[0] in text
    for option in ("--set data.group_regex=null", "--set data.allow_unmatched=true"):
        assert option in text
    with caplog.at_level(logging.WARNING, logger="foldkit"):
        df = make_folds(index, Path("."), group_regex=r"S\d+", allow_unmatched=True)
    assert "150 of 1000 names do not match" in messages(caplog)
    assert df.loc[0, "group"] == "g0"  # an unmatched name is its own group
    index.loc[: len(md5) - 1, "name"] = [f"S{i}_{m}" for i, m in enumerate(md5[:100])] + md5[100:]
    make_folds(index, Path("."), group_regex=r"S\d+")  # 95% match: fine


def test_bundled_groups_stay_whole_and_stratified(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many groups take StratifiedGroupKFold slowly; above the limit small groups are bundled first.
    monkeypatch.setattr(folds_mod, "_MAX_SGKF_GROUPS", 200)
    index = synthetic_index(n=4000, n_subjects=50)
    index.loc[index.index % 2 == 0, "name"] = [f"x{i}.png" for i in range(2000)]  # 2000 singletons
    df = make_folds(index, Path("."), group_regex=r"S\d+", allow_unmatched=True)
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
        ({"hamming": 40}, f"0..{MAX_HAMMING}"),
        ({"near_dup_min_corr": 0.0}, "min-corr"),
        ({"near_dup_max_group": 0}, "max-group"),
    ],
)
def test_bad_settings_are_foldkit_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(FoldkitError, match=message):
        make_folds(synthetic_index(n=100), Path("."), **kwargs)


@pytest.mark.parametrize("hamming", [-1, 0, MAX_HAMMING, MAX_HAMMING + 1, 63])
def test_hamming_range_is_one_rule_for_config_and_folds(hamming: int) -> None:
    try:
        load_config(None, [("data.hamming", hamming)])
        config_ok = True
    except ConfigError:
        config_ok = False
    try:
        make_folds(synthetic_index(n=100), Path("."), hamming=hamming)
        folds_ok = True
    except FoldkitError:
        folds_ok = False
    assert config_ok == folds_ok == (0 <= hamming <= 31)


def test_too_few_groups_for_k_is_a_foldkit_error_naming_options() -> None:
    with pytest.raises(FoldkitError, match="cannot make 5 folds") as err:
        make_folds(synthetic_index(n=200, n_subjects=3), Path("."), group_regex=r"S\d+")
    assert "fewer groups than folds" in str(err.value) and "regex key 'S" in str(err.value)
    assert "--set data.k=N" in str(err.value) and "--set data.group_regex=null" in str(err.value)


def test_a_group_over_n_over_2k_is_an_error_naming_the_regex_key(caplog: pytest.LogCaptureFixture) -> None:
    index = synthetic_index(n=1000, n_subjects=100)
    index.loc[:149, "name"] = [f"S999_{i}.png" for i in range(150)]  # 150 > 1000 / (2 * 5)
    with pytest.raises(FoldkitError) as err:
        make_folds(index, Path("."), group_regex=r"S\d+")
    text = str(err.value)
    assert "largest group holds 150 of 1000 images (15%), over n/(2k) = 100" in text
    assert "regex key 'S999' holds 150 images" in text
    assert "--set data.group_regex=null" in text and "fewer folds" in text
    make_folds(index, Path("."), group_regex=r"S\d+", k=3)  # 150 <= 1000 / 6: fine


def test_assert_no_leak_names_group_and_folds() -> None:
    df = make_folds(synthetic_index(n=100), Path("."))
    assert_no_leak(df)
    df.loc[[3, 4], "group"] = "S99"
    df.loc[[3, 4], "fold"] = [1, 3]
    with pytest.raises(FoldkitError, match=r"group 'S99' is in folds 1, 3"):
        assert_no_leak(df)


# ------------------------------------------------------------------------------------------ near-dup


def test_near_dup_pairs_match_brute_force_each_pair_once() -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, d, replace=False))) for d in range(9)]
    near = np.array([base[i] ^ flips[i % 9] for i in range(60)], dtype=np.uint64)  # distances 0..8
    hashes = np.concatenate([base, near, base[:5]])  # + exact repeats: they agree on every chunk
    a, b = near_dup_pairs(hashes, hamming=6)
    xor = hashes[:, None] ^ hashes[None, :]
    dist = np.array([[bin(int(v)).count("1") for v in row] for row in xor])
    expected = {(i, j) for i, j in zip(*np.nonzero(dist <= 6), strict=True) if i < j}
    assert (a < b).all()
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == sorted(expected)  # no pair twice
    assert len(expected) >= 40


def fake_fingerprints(n: int, seed: int = 0) -> Fingerprints:
    """Fingerprints with no duplicate at all: random 64-bit pHashes, unique pixels, random thumbnails."""
    rng = np.random.default_rng(seed)
    return Fingerprints(
        rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2),
        np.arange(n, dtype=np.uint64) + np.uint64(10**6),
        rng.integers(0, 256, (n, THUMB_SIDE**2), dtype=np.uint8),
    )


def make_copy(fp: Fingerprints, src: int, dst: int, exact: bool, seed: int = 0) -> None:
    """Row ``dst`` becomes a copy of ``src``: identical pixels, or a lightly noised one (2 pHash bits off)."""
    fp.phash[dst] = fp.phash[src] ^ np.uint64(0b101) if not exact else fp.phash[src]
    if exact:
        fp.pixels[dst], fp.thumbs[dst] = fp.pixels[src], fp.thumbs[src]
    else:
        noise = np.random.default_rng(seed).integers(-3, 4, THUMB_SIDE**2)
        fp.thumbs[dst] = np.clip(fp.thumbs[src].astype(int) + noise, 0, 255)


@pytest.fixture
def use_fingerprints(monkeypatch: pytest.MonkeyPatch):
    """Make the fold builder use given fingerprints instead of reading image files."""

    def use(fp: Fingerprints) -> None:
        monkeypatch.setattr(folds_mod, "fingerprint_images", lambda paths, workers=None: fp)

    return use


def test_near_dup_links_follow_the_policy(use_fingerprints, caplog: pytest.LogCaptureFixture) -> None:
    index = synthetic_index(n=400, n_subjects=40, seed=1)
    subject = index["name"].str.extract(r"(S\d+)")[0]
    a, b, c, d, e, f = (int(np.flatnonzero(subject == f"S{s}")[0]) for s in (1, 2, 3, 4, 5, 6))
    index.loc[399, "name"] = "keyless.png"
    fp = fake_fingerprints(400)
    make_copy(fp, a, b, exact=False)  # fuzzy copy under another subject: would bridge S1 and S2
    make_copy(fp, f, 399, exact=False)  # fuzzy copy without a key: joins S6
    make_copy(fp, c, d, exact=True)  # identical pixels under another subject: S3 and S4 join
    fp.phash[e] = fp.phash[c]  # same pHash as c and d, unrelated pixels: fails the pixel check
    use_fingerprints(fp)
    with caplog.at_level(logging.INFO, logger="foldkit"):
        df = make_folds(index, Path("."), group_regex=r"S\d+", near_dup=True)
    group, names, log = df["group"], df["name"], messages(caplog)
    assert group[a] == "S1" and group[b] == "S2" and group[399] == group[f] == "S6"
    assert group[c] == group[d] and group[c].startswith("g") and group[e] == "S5"
    assert df["fold"][c] == df["fold"][d] and df["fold"][399] == df["fold"][f]
    assert "1 images are pixel-identical copies of another" in log
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 pixel-identical copies join two regex groups, which are merged" in m for m in warned)
    assert f"{names[min(c, d)]} = {names[max(c, d)]}" in log
    # Distinct pairs: c~e agrees on all 7 chunks of the hash, d is c's pixel copy; each counts once.
    assert "3 distinct pHash pairs within 6 bits; 3 of them in two groups were pixel-checked, 2 pass" in log
    assert "1 pixel-checked links would bridge two regex groups and were NOT merged" in log
    assert f"{names[min(a, b)]} ~ {names[max(a, b)]} (S" in log
    assert group.nunique() == subject.iloc[:399].nunique() - 1  # S3+S4 joined; keyless.png inside S6


def test_near_dup_links_cannot_chain_past_the_cap(use_fingerprints, caplog: pytest.LogCaptureFixture) -> None:
    index = synthetic_index(n=400, seed=2)
    fp = fake_fingerprints(400)
    for i in range(1, 30):  # 30 mutual near-duplicates without a regex key
        make_copy(fp, 0, i, exact=False, seed=i)
    use_fingerprints(fp)
    with caplog.at_level(logging.INFO, logger="foldkit"):
        capped = make_folds(index, Path("."), near_dup=True, near_dup_max_group=4)
    sizes = capped["group"].iloc[:30].value_counts()
    assert sizes.max() == 4 and sizes.sum() == 30
    assert "would make a group of over 4 images without a regex key" in messages(caplog)
    # the 30 copies now sit in several folds: said after the folds are made, with how many images
    folds_of_copies = capped["fold"].iloc[:30].nunique()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    split = [m for m in warned if "refused by the size cap ended in different folds" in m]
    assert folds_of_copies > 1 and len(split) == 1 and "possible leaks" in split[0]
    whole = make_folds(index, Path("."), near_dup=True, near_dup_max_group=30)
    assert whole["group"].iloc[:30].nunique() == 1


def test_look_alikes_attached_to_a_subject_count_against_the_cap() -> None:
    """40 unkeyed look-alikes of one keyed image: one by one each would join the subject's group,
    chaining without bound through it; the cap counts the subject's unkeyed images too."""
    from foldkit.neardup import THUMB_SIDE, Fingerprints, link_groups

    rng = np.random.default_rng(0)
    n, cap = 41, 16
    key_codes = np.full(n, -1)
    key_codes[0] = 0  # row 0 is named for a subject (its regex key)
    base = rng.integers(0, 256, THUMB_SIDE**2)
    thumbs = np.clip(base + rng.normal(0, 2, (n, THUMB_SIDE**2)), 0, 255).astype(np.uint8)
    fp = Fingerprints(np.zeros(n, np.uint64), np.arange(n, dtype=np.uint64), thumbs)
    comp, report = link_groups(key_codes, fp, hamming=6, min_corr=0.99, max_group=cap)
    assert (comp[1:] == comp[0]).sum() == cap  # the subject took 16 look-alikes, no more
    assert np.bincount(comp).max() == cap + 1 and report.capped
    assert np.bincount(comp[1:]).max() <= cap  # every group holds at most 16 images without a key


def test_identical_copies_joining_many_subjects_is_an_error_naming_pairs(use_fingerprints) -> None:
    index = synthetic_index(n=1000, n_subjects=100, seed=3)
    subject = index["name"].str.extract(r"(S\d+)")[0]
    rows = [int(np.flatnonzero(subject == f"S{s}")[0]) for s in range(20)]
    fp = fake_fingerprints(1000)
    for row in rows[1:]:
        make_copy(fp, rows[0], row, exact=True)
    use_fingerprints(fp)
    with pytest.raises(FoldkitError) as err:
        make_folds(index, Path("."), group_regex=r"S\d+", near_dup=True)
    text = str(err.value)
    assert "over n/(2k) = 100" in text and "identical-pixel copies join 20 regex keys" in text
    assert f"{index['name'][min(rows)]} = " in text and "and 16 more" in text  # 19 pairs, 3 shown
    assert "--set data.near_dup=false" in text


def test_a_large_keyless_duplicate_group_is_an_error_naming_near_dup_links(use_fingerprints) -> None:
    index = synthetic_index(n=1000, seed=4)
    fp = fake_fingerprints(1000)
    for i in range(1, 150):
        make_copy(fp, 0, i, exact=True)
    use_fingerprints(fp)
    with pytest.raises(FoldkitError) as err:
        make_folds(index, Path("."), near_dup=True)
    text = str(err.value)
    assert "largest group holds 150 of 1000" in text
    assert "150 images without a regex key joined by near-duplicate links (1 identical-pixel sets" in text
    assert "--set data.near_dup=false" in text


# Real images: synthetic aligned faces, where pHash alone cannot tell two people apart.


def _reencode(path: Path, rng: np.random.Generator) -> Image.Image:
    """A lightly noised (sigma 3) copy, re-encoded as JPEG q90 and decoded again."""
    arr = np.asarray(Image.open(path).convert("RGB")).astype(float) + rng.normal(0, 3, (112, 112, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    buf.seek(0)
    return Image.open(buf)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 synthetic 112 px faces of 40 subjects, plus copies of the first four validate images.

    ``copy_exact.png``: PNG re-save (same pixels), ``copy_jpeg.jpg``: noised JPEG q90, both without a
    subject id; ``S0nn_exact_other.png`` / ``S0nn_jpeg_other.jpg``: the same under another subject's id.
    """
    data = tmp_path_factory.mktemp("faces") / "data"
    generate(data, 225, 75, 0, seed=1, size=112, n_subjects=40, workers=1)
    rows = [line.split() for line in label_file(data, "validate").read_text().splitlines()]
    (n0, l0), (n1, l1), (n2, l2), (n3, l3) = rows[:4]
    other2 = "S040" if "S040" not in n2 else "S039"  # another subject's id for each cross-subject copy
    other3 = "S038" if "S038" not in n3 else "S037"
    rng = np.random.default_rng(0)
    train = data / "train"
    Image.open(data / "validate" / n0).save(train / "copy_exact.png")
    _reencode(data / "validate" / n1, rng).save(train / "copy_jpeg.jpg", quality=95)
    Image.open(data / "validate" / n2).save(train / f"{other2}_exact_other.png")
    _reencode(data / "validate" / n3, rng).save(train / f"{other3}_jpeg_other.jpg", quality=95)
    extra = [f"copy_exact.png {l0}", f"copy_jpeg.jpg {l1}", f"{other2}_exact_other.png {l2}"]
    extra.append(f"{other3}_jpeg_other.jpg {l3}")
    with label_file(data, "train").open("a") as fh:
        fh.write("\n".join(extra) + "\n")
    return data


def test_copies_of_a_face_land_in_its_fold_with_the_default_config(
    faces: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = fold_settings(load_config(DEFAULT_YAML).data)
    assert settings["near_dup"] and settings["group_regex"]
    with caplog.at_level(logging.INFO, logger="foldkit"):
        df = make_folds(read_trainval(faces), faces, workers=1, **settings).set_index("name")
    validate = [line.split()[0] for line in label_file(faces, "validate").read_text().splitlines()[:4]]
    subject = df.index.str.extract(r"(S\d+)", expand=False)
    for copy, original in zip(["copy_exact.png", "copy_jpeg.jpg"], validate[:2], strict=True):
        assert df.loc[copy, "group"] == df.loc[original, "group"]
        assert df.loc[copy, "fold"] == df.loc[original, "fold"]
    exact_other = next(n for n in df.index if n.endswith("_exact_other.png"))
    assert df.loc[exact_other, "group"] == df.loc[validate[2], "group"]  # identical pixels: always join
    assert df.loc[exact_other, "fold"] == df.loc[validate[2], "fold"]
    jpeg_other = next(n for n in df.index if n.endswith("_jpeg_other.jpg"))
    assert df.loc[jpeg_other, "group"] == jpeg_other[:4] != df.loc[validate[3], "group"]  # not bridged
    log = messages(caplog)
    assert "1 pixel-checked links would bridge two regex groups and were NOT merged" in log
    assert jpeg_other in log and validate[3] in log
    assert df["group"].nunique() == subject.nunique() - 1  # only the identical copy joined two subjects


def test_look_alike_faces_do_not_chain_subjects(faces: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reported defect: pHash neighbours of aligned faces merged whole subjects into a few groups."""
    index = read_trainval(faces)
    index = index[~index["name"].str.contains("copy|other")].reset_index(drop=True)
    with caplog.at_level(logging.INFO, logger="foldkit"):
        df = make_folds(index, faces, group_regex=r"S\d+", near_dup=True, hamming=12, workers=1)
    found = re.search(
        r"(\d+) distinct pHash pairs within 12 bits; (\d+) of them in two groups", messages(caplog)
    )
    assert int(found[2]) >= 50  # many cross-subject candidates, which a pHash-only rule would merge
    assert df["group"].nunique() == 40
    flat = make_folds(index, faces, near_dup=True, hamming=12, workers=1)  # no regex: no merge either
    assert flat["group"].nunique() == len(index)


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
    """``n`` distinct images in train/validate, plus copies: ``a`` exact (other split), ``b`` noisy JPEG."""
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
    df = make_folds(
        index, data, group_regex=r"img[0-4]\b|img1\d", near_dup=True, allow_unmatched=True, workers=1
    ).set_index("name")
    # img1 and its noisy copy copy_b share one key "img1"; the exact copy of img0 joins key "img0".
    assert df.loc["copy_b.jpg", "group"] == "img1"
    assert df.loc["copy_a.png", "group"] == "img0"
    assert df.loc[["img10.png", "img11.png"], "group"].tolist() == ["img10", "img11"]
    assert_no_leak(df.reset_index())


def test_fingerprints_in_parallel_match_serial(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    paths = []
    for i in range(300):  # over the threshold where a process pool is used
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
        paths.append(str(path))
    parallel, serial = fingerprint_images(paths, workers=2), fingerprint_images(paths, workers=1)
    for got, want in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(got, want)
    assert serial.thumbs.shape == (300, THUMB_SIDE**2) and serial.thumbs.dtype == np.uint8
    assert len(np.unique(serial.pixels)) == 300


def test_unreadable_image_fails_hashing(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(FoldkitError, match="cannot read image for hashing"):
        fingerprint_images([str(tmp_path / "bad.png")], workers=1)


# ---------------------------------------------------------------------------------------------- artifacts


def make_data(root: Path, n_train: int = 30, n_validate: int = 10, names: list[str] | None = None) -> Path:
    """Tiny images named S<subject>_<i>.png (20 subjects, or ``names``) with alternating labels."""
    data = root / "data"
    names = list(names or [f"S{i % 20}_{i}.png" for i in range(n_train + n_validate)])
    for p, (phase, n) in enumerate((("train", n_train), ("validate", n_validate))):
        (data / phase).mkdir(parents=True)
        lines = []
        for i in range(n):
            name = names.pop(0)
            Image.new("RGB", (16, 16), (i * 5, p * 100, 0)).save(data / phase / name)
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
    assert list(meta) == [*SETTING_KEYS, "n", "data_hash", "hash"]
    assert list(SETTINGS) == list(SETTING_KEYS)
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
    with pytest.raises(FoldkitError, match=r"does not match the hash.*main\.py --refold or"):
        load_folds(tmp_path / "w")
    (tmp_path / "w" / "folds" / "folds.json").write_text('{"k": 2, ')
    with pytest.raises(FoldkitError, match=r"folds\.json is unreadable .*main\.py --refold"):
        load_folds(tmp_path / "w")


def test_missing_folds_hint_keeps_data_dir_and_settings(tmp_path: Path) -> None:
    with pytest.raises(FoldkitError) as err:
        folds_hash(tmp_path / "w")
    text = str(err.value)
    assert f"python main.py --config CONFIG --data-dir DATA --work-dir {tmp_path / 'w'} --fold" in text
    assert f"python -m foldkit.folds --config CONFIG --data-dir DATA --work-dir {tmp_path / 'w'}" in text


def test_write_folds_refuses_a_leak(tmp_path: Path) -> None:
    df = make_folds(synthetic_index(n=100), Path("."))
    df.loc[[0, 1], "group"] = "same"
    df.loc[[0, 1], "fold"] = [0, 1]
    with pytest.raises(FoldkitError, match="fold leak"):
        write_folds(df, tmp_path / "w", SETTINGS)
    assert not (tmp_path / "w" / "folds").exists()


def test_rerun_gives_identical_bytes(tmp_path: Path) -> None:
    data = make_data(tmp_path)
    ensure_folds(data, tmp_path / "a", group_regex=r"S\d+", near_dup=True, workers=1)
    ensure_folds(data, tmp_path / "b", group_regex=r"S\d+", near_dup=True, workers=1, force=True)
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
        assert "rebuilding the folds" in messages(caplog) and "no usable folds yet" in messages(caplog)
        os.utime(csv, ns=(0, 0))  # a rewrite would show as a new mtime
        df, again = ensure_folds(data, work, group_regex=r"S\d+")
        assert again == meta and csv.stat().st_mtime_ns == 0
        assert "reusing the folds" in caplog.records[-1].getMessage()
        assert len(df) == 40

        for unused in ({"hamming": 3}, {"near_dup_min_corr": 0.5}, {"near_dup_max_group": 2}):
            ensure_folds(data, work, group_regex=r"S\d+", **unused)  # unused without near_dup: reused
        ensure_folds(data, work, group_regex=r"S\d+", allow_unmatched=True)  # not a setting of folds
        assert csv.stat().st_mtime_ns == 0

        _, changed = ensure_folds(data, work, group_regex=r"S\d+", k=4)
        assert changed["k"] == 4
        assert "settings changed: k 5 -> 4" in messages(caplog)

        with label_file(data, "validate").open("a") as fh:
            fh.write("S1_new.png 1\n")
        Image.new("RGB", (16, 16)).save(data / "validate" / "S1_new.png")
        _, rebuilt = ensure_folds(data, work, group_regex=r"S\d+", k=4)
    assert rebuilt["n"] == 41 and rebuilt["data_hash"] != changed["data_hash"]
    assert "the data changed" in messages(caplog)


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


def cli(data: Path, work: Path, *args: str) -> int:
    return main(["--data-dir", str(data), "--work-dir", str(work), "--workers", "1", *args])


def test_cli_prints_table_and_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, work = make_data(tmp_path), tmp_path / "w"
    assert cli(data, work, "--k", "3", "--group-regex", r"S\d+") == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["fold", "n", "fakes", "fake_ratio", "n_train", "n_validate", "groups"]
    assert out.splitlines()[4].split()[:2] == ["total", "40"]
    meta = json.loads((work / "folds" / "folds.json").read_text())
    assert meta["k"] == 3 and meta["group_regex"] == r"S\d+" and meta["hash"] in out
    df, _ = load_folds(work)
    assert_groups_whole(df, df["group"])
    assert df["group"].nunique() == 20


def test_cli_takes_settings_from_the_config_and_flags_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, work = make_data(tmp_path), tmp_path / "w"
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  k: 3\n  fold_seed: 7\n  group_regex: 'S\\d+'\n  near_dup: false\n")
    meta_path = work / "folds" / "folds.json"
    assert cli(data, work, "--config", str(config)) == 0
    meta = json.loads(meta_path.read_text())
    assert (meta["k"], meta["seed"], meta["group_regex"], meta["near_dup"]) == (3, 7, r"S\d+", False)
    assert cli(data, work, "--config", str(config), "--set", "data.k=2", "--k", "4") == 0  # flag wins
    assert json.loads(meta_path.read_text())["k"] == 4
    err = capsys.readouterr().err  # the CLI logs to stderr (its own handler, not caplog)
    assert "rebuilding the folds" in err and "settings changed: k 3 -> 4" in err
    assert cli(data, work, "--config", str(config), "--k", "4") == 0
    assert "reusing the folds" in capsys.readouterr().err
    # main.py, given the same config, asks ensure_folds for exactly these settings: it reuses them too
    os.utime(work / "folds" / "folds.csv", ns=(0, 0))
    settings = fold_settings(load_config(config, [("data.k", 4)]).data)
    ensure_folds(data, work, **settings)
    assert (work / "folds" / "folds.csv").stat().st_mtime_ns == 0


def test_cli_defaults_to_the_default_config(tmp_path: Path) -> None:
    data, work = make_data(tmp_path), tmp_path / "w"
    assert cli(data, work) == 0
    meta = json.loads((work / "folds" / "folds.json").read_text())
    expected = fold_settings(load_config(DEFAULT_YAML).data)
    assert {key: meta[key] for key in SETTING_KEYS} == {key: expected[key] for key in SETTING_KEYS}
    assert meta["near_dup"] is True and meta["group_regex"] == r"S\d+"


def test_main_py_checks_the_group_regex_before_decoding_any_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default regex on names without a subject key: main.py says so in a second, naming options
    it accepts, before the image store decodes every image (hours for a large set)."""
    from conftest import train_tiny

    md5 = [hashlib.md5(str(i).encode()).hexdigest() + ".png" for i in range(40)]
    data, work = make_data(tmp_path, names=md5), tmp_path / "w"
    assert train_tiny(data, work, "--set", r"data.group_regex=S\d+") == 2
    err = capsys.readouterr().err
    assert "matches only 0 of 40 names" in err and "--set data.group_regex=null" in err
    assert "--group-regex" not in err and "--allow-unmatched" not in err  # foldkit.folds' flags only
    assert not (work / "store").exists() and not (work / "folds").exists()


def test_main_py_names_every_set_up_problem_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """md5 names and unavailable pretrained weights: a new user learns both fixes from one run."""
    from conftest import train_tiny

    import foldkit.models

    def offline(*args, **kwargs):
        raise foldkit.models.PretrainedUnavailable({"test_efficientnet": "no internet"})

    monkeypatch.setattr(foldkit.models, "create_model", offline)
    md5 = [hashlib.md5(str(i).encode()).hexdigest() + ".png" for i in range(40)]
    data, work = make_data(tmp_path, names=md5), tmp_path / "w"
    assert train_tiny(data, work, "--set", r"data.group_regex=S\d+") == 2
    err = capsys.readouterr().err
    assert "2 problems stop the run before any work." in err
    assert "problem 1 of 2: group_regex 'S\\d+' matches only 0 of 40 names" in err
    assert "problem 2 of 2: pretrained weights cannot be loaded" in err and "no internet" in err
    assert not (work / "store").exists() and not (work / "folds").exists()


def test_main_py_reuses_folds_made_with_allow_unmatched(tmp_path: Path) -> None:
    """Folds the folds CLI built with --allow-unmatched are current for main.py with the same
    config: the early regex check must not refuse what ensure_folds would reuse."""
    from conftest import train_tiny

    md5 = [hashlib.md5(str(i).encode()).hexdigest() + ".png" for i in range(8)]
    data, work = make_data(tmp_path, names=[*md5, *(f"S{i % 16}_{i}.png" for i in range(32))]), tmp_path / "w"
    assert cli(data, work, "--config", "configs/demo.yaml", "--k", "2", "--allow-unmatched") == 0
    before = (work / "folds" / "folds.csv").read_bytes()
    assert train_tiny(data, work, "--model", "test_efficientnet", "--fold", "0") == 0
    assert (work / "folds" / "folds.csv").read_bytes() == before
    assert train_tiny(data, tmp_path / "fresh", "--model", "test_efficientnet", "--fold", "0") == 2


def test_cli_unmatched_regex_error_and_its_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    md5 = [hashlib.md5(str(i).encode()).hexdigest() + ".jpg" for i in range(40)]
    data, work = make_data(tmp_path, names=md5), tmp_path / "w"
    assert cli(data, work) == 2
    err = capsys.readouterr().err
    assert "matches only 0 of 40 names" in err and "--set data.allow_unmatched=true" in err
    assert not (work / "folds").exists()
    for options in (["--allow-unmatched"], ["--set", "data.allow_unmatched=true"]):
        assert cli(data, work, *options, "--force") == 0
    for options in (["--set", "data.group_regex=null"], ["--group-regex", ""]):
        assert cli(data, work, *options) == 0
        assert json.loads((work / "folds" / "folds.json").read_text())["group_regex"] is None


def test_cli_help_shows_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    options = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert {"config", "data_dir", "work_dir", "overrides", "k", "seed", "group_regex", "allow_unmatched"} <= {
        a.dest for a in options
    }
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for action in options:
        block = next(b for b in blocks if b.strip().startswith(action.option_strings[0]))
        assert "default" in block, block
    assert "(default: 5 from configs/default.yaml)" in " ".join(text.split())


def test_cli_module_exit_status(tmp_path: Path) -> None:
    data, work = make_data(tmp_path), tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": str(Path(foldkit.__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "foldkit.folds", "--data-dir", str(data), "--work-dir", str(work), "--force"]
    ensure_folds(data, work)
    before = {p.name: p.read_bytes() for p in (work / "folds").iterdir()}
    label_file(data, "train").write_text("S0_0.png 2\n")
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert f"{label_file(data, 'train')}:1: label must be 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert {p.name: p.read_bytes() for p in (work / "folds").iterdir()} == before  # nothing written


def test_many_mixed_groups_still_give_balanced_folds() -> None:
    """Over 10,000 groups, small single-label ones are bundled for speed. With ~10,500 subjects that
    each hold a real and a fake image, the bundle budget used to fall to one bundle per label: one
    fold got every real-only image, another every fake-only one (fake ratios 100% / 0%)."""
    n_mixed, n_single = 10_500, 20_000
    names = [f"S{s}_{x}.png" for s in range(n_mixed) for x in "ab"] + [f"x{i}.png" for i in range(n_single)]
    labels = [0, 1] * n_mixed + np.random.default_rng(0).integers(0, 2, n_single).tolist()
    index = pd.DataFrame({"name": names, "path": ["train/" + n for n in names], "label": labels})
    index["source"] = "train"
    folds = make_folds(index, "/nonexistent", k=5, seed=42, group_regex=r"S\d+", allow_unmatched=True)
    ratios = folds.groupby("fold").label.mean()
    assert len(ratios) == 5 and (ratios - folds.label.mean()).abs().max() < 0.015, ratios.tolist()
    assert folds.groupby("group").fold.nunique().max() == 1


def test_near_dup_folds_are_rebuilt_when_an_image_is_replaced_under_its_name(tmp_path: Path) -> None:
    """With near_dup the pixels decide the groups: a validate image overwritten with a copy of a
    train image in another fold (names and labels unchanged) used to reuse the old folds, keeping
    the two copies in two folds."""
    data, work = make_data(tmp_path, names=[f"img{i}.png" for i in range(40)]), tmp_path / "w"
    rng = np.random.default_rng(0)
    for f in (data / "train").glob("*.png"):  # faces have texture: solid colours count as blank
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(f)
    for f in (data / "validate").glob("*.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(f)
    df, first = ensure_folds(data, work, k=4, near_dup=True)
    fold = df.set_index("path").fold
    src = next(p for p in df.path[df.source == "train"] if df.label[df.path == p].item() == 1)
    dst = next(p for p in df.path[(df.source == "validate") & (df.label == 1)] if fold[p] != fold[src])
    shutil.copyfile(data / src, data / dst)
    df, rebuilt = ensure_folds(data, work, k=4, near_dup=True)
    assert rebuilt["data_hash"] != first["data_hash"]
    fold = df.set_index("path").fold
    assert fold[src] == fold[dst]
    _, again = ensure_folds(data, work, k=4, near_dup=True)  # nothing changed since: reused
    assert again == rebuilt


def test_a_fold_without_fakes_is_refused_naming_the_counts() -> None:
    """2 fakes for 5 folds left three folds without any (no F1, no threshold), with exit 0."""
    index = synthetic_index(n=200, n_subjects=200)
    index["label"] = 0
    index.loc[[3, 50], "label"] = 1
    with pytest.raises(FoldkitError, match=r"fold \d holds no fake \(1\) image.*198 real and 2 fake images"):
        make_folds(index, Path("."), k=5)
    index["label"] = 0
    with pytest.raises(FoldkitError, match=r"fold 0 holds no fake \(1\) image.*Options: fewer folds"):
        make_folds(index, Path("."), k=2)


def test_regex_check_runs_on_new_names_even_with_the_same_settings(tmp_path: Path) -> None:
    """Folds made with S\\d+ on subject names; then md5-named data arrives with unchanged settings: the
    coverage check must stop it by the names (before the store decodes), not trust the old folds."""
    data, work = make_data(tmp_path), tmp_path / "w"
    cfg = load_config(None, []).data
    ensure_folds(data, work, **fold_settings(cfg))
    check_group_regex(read_trainval(data).name, cfg, work)  # the same names: skipped, no error
    hashed = pd.Series([hashlib.md5(str(i).encode()).hexdigest() + ".png" for i in range(40)])
    with pytest.raises(FoldkitError, match="group_regex"):
        check_group_regex(hashed, cfg, work)


def test_a_negative_fold_seed_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r"data.fold_seed: -1 is out of range"):
        load_config(None, [parse_override("data.fold_seed=-1")])


def test_identical_images_with_both_labels_are_warned_by_name(
    use_fingerprints, caplog: pytest.LogCaptureFixture
) -> None:
    index = synthetic_index(n=400)
    real, fake = int(np.flatnonzero(index.label == 0)[0]), int(np.flatnonzero(index.label == 1)[0])
    fp = fake_fingerprints(400)
    make_copy(fp, real, fake, exact=True)
    use_fingerprints(fp)
    with caplog.at_level(logging.INFO, logger="foldkit"):
        df = make_folds(index, Path("."), group_regex=None, near_dup=True)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    line = f"{index.name[real]} (0) = {index.name[fake]} (1)"
    assert any("1 set(s) of pixel-identical images carry both labels" in m and line in m for m in warned)
    assert df.fold[real] == df.fold[fake]


def test_identical_blank_images_do_not_merge_subjects(
    use_fingerprints, caplog: pytest.LogCaptureFixture
) -> None:
    """Black crops (failed face detections) under six subjects are pixel-identical: joining them
    merged the subjects (or made a group too large to fold, with advice that could not help)."""
    index = synthetic_index(n=400)
    keys = index.name.str.extract(r"(S\d+)")[0]
    rows = [int(keys[keys == k].index[0]) for k in keys.unique()[:6]]
    fp = fake_fingerprints(400)
    for r in rows:
        fp.pixels[r], fp.thumbs[r], fp.phash[r] = fp.pixels[rows[0]], 0, 0
    use_fingerprints(fp)
    with caplog.at_level(logging.INFO, logger="foldkit"):
        df = make_folds(index, Path("."), group_regex=r"S\d+", near_dup=True)
    assert df.group[rows].tolist() == keys[rows].tolist()  # each stays with its own subject
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("6 near-blank image(s) (failed crops?) are linked to nothing" in m for m in warned)
    assert not any("would bridge" in m for m in warned)


def test_near_blank_images_are_not_linked_fuzzily_either(use_fingerprints) -> None:
    """Dark crops that differ by a level here and there have other pixel hashes but the same pHash and
    r = 1 thumbnails: they went through the pair search (quadratic in their number) and joined."""
    index = synthetic_index(n=400)
    index["name"] = [f"{i:032x}.png" for i in range(400)]  # md5-like: no regex keys
    fp = fake_fingerprints(400)
    rows = list(range(0, 60, 2))
    for i, r in enumerate(rows):
        fp.phash[r] = 0
        fp.thumbs[r] = 1
        fp.thumbs[r][: i % 3] = 3  # not perfectly flat, but within BLANK_RANGE
    use_fingerprints(fp)
    df = make_folds(index, Path("."), group_regex=None, near_dup=True)
    assert df.group[rows].nunique() == len(rows)


def test_blank_means_a_failed_crop_not_a_dark_face(tiny_data: Path, tmp_path: Path) -> None:
    """BLANK_RANGE: a black crop with JPEG noise is blank; a face darkened to a tenth is not."""
    from foldkit.neardup import BLANK_RANGE, _fingerprint_one

    def span(path: Path) -> int:
        thumb = np.frombuffer(_fingerprint_one(str(path))[0][2], np.uint8).astype(int)
        return int(thumb.max() - thumb.min())

    noise = np.random.default_rng(0).normal(3, 2, (112, 112, 3)).clip(0, 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "black.jpg", quality=75)
    assert span(tmp_path / "black.jpg") <= BLANK_RANGE
    for i, face in enumerate(sorted((tiny_data / "train").glob("*.png"))):
        dark = (np.asarray(Image.open(face).convert("RGB")) * 0.1).round().astype(np.uint8)
        Image.fromarray(dark).save(tmp_path / f"dark{i}.png")
        assert span(tmp_path / f"dark{i}.png") > BLANK_RANGE, face.name
