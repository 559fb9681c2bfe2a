"""`make demo`'s driver: the stage commands, a failing stage named, the closing summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foldkit import demo
from foldkit.io import FoldkitError


def test_stages_are_the_user_commands_with_the_demo_config(tmp_path: Path) -> None:
    st = dict(demo.stages(tmp_path / "d", tmp_path / "w", 2000, seed=0))
    assert list(st) == ["data", "folds", "store", "training", "ensemble"]
    assert st["data"][st["data"].index("--n-train") + 1] == "1500"
    assert st["data"][st["data"].index("--n-validate") + 1] == "500"
    assert st["training"][:3] == ["main.py", "--config", "configs/demo.yaml"]
    assert st["folds"][st["folds"].index("--config") + 1] == "configs/demo.yaml"  # main.py then reuses them
    assert st["ensemble"][:3] == ["ensemble.py", "--mode", "test"]


def test_a_failing_stage_is_named_with_its_command() -> None:
    with pytest.raises(FoldkitError, match=r"demo stage 'folds' failed \(exit status 3\)"):
        demo.run_stage("folds", ["-c", "import sys; sys.exit(3)"])
    assert demo.run_stage("ok", ["-c", "pass"]) >= 0


def test_summary_times_each_stage_and_compares_with_the_best_model(tmp_path: Path) -> None:
    report = {
        "summary": {"method": "mean", "in_sample_f1": 0.91, "nested_cv_f1": 0.9},
        "models": {"test_resnet": {"overall": {"best_f1": 0.89}}, "x": {"overall": {"best_f1": 0.7}}},
    }
    (tmp_path / "oof/demo").mkdir(parents=True)
    (tmp_path / "oof/demo/report.json").write_text(json.dumps(report))
    text = demo.summary({"data": 10.0, "folds": 2.0, "training": 150.0, "ensemble": 20.0}, tmp_path)
    first, second = text.splitlines()[:2]
    assert first.startswith(
        "demo timings: data 10 s, folds 2 s, training 150 s, ensemble 20 s; total 3.0 min"
    )
    assert second.endswith("vs best single model test_resnet 0.8900: the blend wins by +0.0200")
    assert demo.main(["--n-trainval", "10"]) == 2
