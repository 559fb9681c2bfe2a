"""The synthetic data set: real layout and names, determinism, and a signal that is real but not linear."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foldkit import PROJECT_ROOT, synthetic
from foldkit.io import FoldkitError
from foldkit.synthetic import SPLITS, Job, generate, main, render_job

NAME_RE = re.compile(r"^\d{8}_S\d{3}_L\d_E\d{2}_C\d{2}_cropped\.png$")
HASHED_RE = re.compile(r"^[0-9a-f]{32}\.png$")
COUNTS = {"train": 16, "validate": 8, "test": 6}
SIZE = 32


def read_labels(root: Path, split: str) -> list[tuple[str, int | None]]:
    """Parse a label file strictly: ``\\n`` endings, ``name label`` (or just ``name`` for test)."""
    raw = (root / split / f"{split}_label.txt").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    rows = []
    for line in raw.decode().splitlines():
        parts = line.split(" ")
        if split == "test":
            assert len(parts) == 1
            rows.append((parts[0], None))
        else:
            assert len(parts) == 2 and parts[1] in {"0", "1"}
            rows.append((parts[0], int(parts[1])))
    return rows


def subject_of(name: str) -> str:
    match = re.search(r"_S(\d{3})_", name)
    assert match
    return match.group(1)


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make(out: Path, seed: int = 0, **kwargs: object) -> dict[str, int]:
    return generate(out, COUNTS["train"], COUNTS["validate"], COUNTS["test"], seed=seed, size=SIZE, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    assert make(out, workers=1) == COUNTS
    return out


def test_layout_and_label_files(data: Path) -> None:
    assert sorted(p.name for p in data.iterdir()) == sorted(SPLITS)
    for split in SPLITS:
        rows = read_labels(data, split)
        assert len(rows) == COUNTS[split]
        pngs = {p.name for p in (data / split).glob("*.png")}
        assert pngs == {name for name, _ in rows}
        assert {p.name for p in (data / split).iterdir()} == pngs | {f"{split}_label.txt"}


def test_images_are_rgb_png_of_the_requested_size(data: Path) -> None:
    for path in data.rglob("*.png"):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (SIZE, SIZE))


def test_names_are_unique_and_follow_the_real_pattern(data: Path) -> None:
    names = [name for split in SPLITS for name, _ in read_labels(data, split)]
    assert len(set(names)) == len(names)
    assert all(NAME_RE.match(n) and re.search(r"_S\d{3}_", n) for n in names)


def test_classes_are_balanced(data: Path) -> None:
    for split in ("train", "validate"):
        labels = [label for _, label in read_labels(data, split)]
        assert sum(labels) == len(labels) // 2


def test_train_and_validate_share_subjects_and_test_subjects_are_new(data: Path) -> None:
    subjects = {s: {subject_of(n) for n, _ in read_labels(data, s)} for s in SPLITS}
    assert subjects["train"] & subjects["validate"]
    assert len(subjects["train"]) >= 2
    assert not subjects["test"] & (subjects["train"] | subjects["validate"])


def test_hashed_names_are_md5_of_the_descriptive_names(data: Path, tmp_path: Path) -> None:
    make(tmp_path, hashed_names=True, workers=1)
    for split in SPLITS:
        plain = [n for n, _ in read_labels(data, split)]
        hashed = [n for n, _ in read_labels(tmp_path, split)]
        assert all(HASHED_RE.match(n) for n in hashed)
        assert hashed == [hashlib.md5(n.encode()).hexdigest() + ".png" for n in plain]
        assert (tmp_path / split / hashed[0]).read_bytes() == (data / split / plain[0]).read_bytes()


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synthetic, "MIN_IMAGES_FOR_POOL", 1)  # force the process pool on a tiny set
    make(tmp_path / "again", workers=2)
    assert all_bytes(tmp_path / "again") == all_bytes(data)
    make(tmp_path / "other", seed=1, workers=1)
    other = all_bytes(tmp_path / "other")
    assert set(other.values()).isdisjoint(all_bytes(data).values())


def test_a_fake_changes_the_inner_face_but_not_the_surroundings() -> None:
    for index in range(4):
        real, _ = render_job(Job("", 0, 0, index, 1, -1, 0, 64))
        fake, _ = render_job(Job("", 0, 0, index, 1, 2, 1, 64))
        diff = np.abs(np.asarray(real, np.float32) - np.asarray(fake, np.float32)).mean(axis=2)
        assert diff[:4].mean() < diff[24:40, 24:40].mean() / 5


def test_bad_arguments_raise_the_toolkit_error(tmp_path: Path) -> None:
    with pytest.raises(FoldkitError):
        generate(tmp_path, 4, 4, 4, n_subjects=1)
    assert main(["--out", str(tmp_path), "--n-train", "-1", "--n-validate", "1", "--n-test", "1"]) == 2


@pytest.mark.parametrize("flag", ["--n-train", "--n-validate", "--n-test"])
def test_cli_refuses_an_empty_split_and_writes_nothing(tmp_path: Path, flag: str, capsys) -> None:
    counts = {"--n-train": "4", "--n-validate": "2", "--n-test": "2", flag: "0"}
    argv = ["--out", str(tmp_path / "out"), *(x for kv in counts.items() for x in kv)]
    assert main(argv) == 2
    assert f"{flag} 0: every split needs at least 1 image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FoldkitError, match="n_train and n_validate must be >= 1"):
        generate(tmp_path / "api", 0, 2, 2)


def test_cli_writes_the_data_set(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["--out", str(out), "--n-train", "6", "--n-validate", "4", "--n-test", "3", "--seed", "2",
            "--size", "32", "--hashed-names", "--n-subjects", "3", "--workers", "1"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "foldkit.synthetic", *args], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "13 images" in proc.stdout
    assert [len(read_labels(out, s)) for s in SPLITS] == [6, 4, 3]


#: sha256 (first 16 hex) of the fixture's label files as written before --fake-ratio existed: the default
#: must keep writing exactly these (labels and names depend only on numpy's stable Generator streams).
PINNED_LABEL_FILES = {"train": "d3745dd5d7c74483", "validate": "cfa54b82cc917d62", "test": "d61c11399ece148e"}


def cli_args(out: Path, *extra: str) -> list[str]:
    """The fixture's data set as command-line arguments, plus ``extra``."""
    counts = [x for s in SPLITS for x in (f"--n-{s}", str(COUNTS[s]))]
    return ["--out", str(out), *counts, "--seed", "0", "--size", str(SIZE), "--workers", "1", *extra]


def read_truth(path: Path) -> list[tuple[str, int]]:
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    rows = [line.split(" ") for line in raw.decode().splitlines()]
    assert all(len(r) == 2 and r[1] in {"0", "1"} for r in rows)
    return [(name, int(label)) for name, label in rows]


def test_default_output_is_byte_identical_to_before_and_to_an_explicit_half(
    data: Path, tmp_path: Path
) -> None:
    for split in SPLITS:
        digest = hashlib.sha256((data / split / f"{split}_label.txt").read_bytes()).hexdigest()
        assert digest[:16] == PINNED_LABEL_FILES[split]
    assert main(cli_args(tmp_path / "half", "--fake-ratio", "0.5")) == 0
    assert all_bytes(tmp_path / "half") == all_bytes(data)  # every image too, not just one
    assert [synthetic.n_fakes(n, 0.5) for n in range(40)] == [n // 2 for n in range(40)]  # odd n too


def test_fake_ratio_gives_exactly_round_n_r_fakes_per_split_and_keeps_the_images(
    data: Path, tmp_path: Path
) -> None:
    out, truth = tmp_path / "tenth", tmp_path / "truth.txt"
    make(out, workers=1, fake_ratio=0.1, truth=truth)
    labels = {s: [label for _, label in read_labels(out, s)] for s in ("train", "validate")}
    labels["test"] = [label for _, label in read_truth(truth)]
    for split in SPLITS:
        assert sum(labels[split]) == round(COUNTS[split] * 0.1)  # 2, 1, 1: no ties here
        # the ratio only picks which images are fakes: the names, and every image whose label stayed,
        # are the default run's bytes
        assert [n for n, _ in read_labels(out, split)] == [n for n, _ in read_labels(data, split)]
    kept = [
        (split, name)
        for split in ("train", "validate")
        for (name, old), new in zip(read_labels(data, split), labels[split], strict=True)
        if old == new
    ]
    assert len(kept) >= COUNTS["train"] // 2
    assert all((out / s / n).read_bytes() == (data / s / n).read_bytes() for s, n in kept)


def test_truth_file_holds_the_test_labels_in_test_label_file_order(tmp_path: Path) -> None:
    out, truth = tmp_path / "data", tmp_path / "scoring" / "truth.txt"
    assert main(cli_args(out, "--fake-ratio", "0.4", "--truth", str(truth))) == 0
    rows = read_truth(truth)
    assert [name for name, _ in rows] == [name for name, _ in read_labels(out, "test")]  # names only there
    assert sum(label for _, label in rows) == round(COUNTS["test"] * 0.4)
    assert {p.name for p in (out / "test").iterdir()} == {n for n, _ in rows} | {"test_label.txt"}


def test_without_truth_no_truth_file_is_written(data: Path) -> None:
    assert sorted(p.name for p in data.parent.iterdir()) == ["data"]


@pytest.mark.parametrize("ratio", ["0", "1", "-0.2", "1.5", "nan"])
def test_a_fake_ratio_outside_0_1_exits_2_and_writes_nothing(tmp_path: Path, ratio: str, capsys) -> None:
    argv = cli_args(tmp_path / "out", "--fake-ratio", ratio, "--truth", str(tmp_path / "truth.txt"))
    assert main(argv) == 2
    assert f"--fake-ratio {float(ratio)}: the share of fakes must be > 0 and < 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_truth_file_inside_the_data_folders_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(cli_args(out, "--truth", str(out / "test" / "truth.txt"))) == 2
    assert "keep the test labels outside the data folders" in capsys.readouterr().err
    assert not out.exists()


def test_help_documents_every_option_with_its_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--fake-ratio FAKE_RATIO share of fakes in every split" in text and "(default: 0.5)" in text
    assert "--truth TRUTH also write the test labels" in text and "default: not written" in text
    for flag in ("--out", "--n-train", "--n-validate", "--n-test", "--seed", "--hashed-names", "--size",
                 "--n-subjects", "--workers"):  # fmt: skip
        assert flag in text


@pytest.mark.slow
def test_a_linear_model_on_raw_pixels_stays_under_f1_0_9(tmp_path: Path) -> None:
    """Guards the task's difficulty: if raw pixels separate the classes linearly, the demo shows nothing."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    generate(tmp_path, 1500, 500, 0, seed=11, size=32, workers=2)

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = read_labels(tmp_path, split)
        x = np.stack([np.asarray(Image.open(tmp_path / split / n), np.float32).ravel() for n, _ in rows])
        return x, np.array([label for _, label in rows])

    (x_train, y_train), (x_val, y_val) = load("train"), load("validate")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(C=0.01, max_iter=2000).fit((x_train - mean) / std, y_train)
    f1 = f1_score(y_val, clf.predict((x_val - mean) / std))
    assert f1 < 0.9, f"linear F1 {f1:.3f}: the fake signal is too easy"
