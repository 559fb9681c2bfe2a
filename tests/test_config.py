"""Config: precedence, type checks, unknown keys, round trip, and every shipped config loads."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml

import main
from foldkit import PROJECT_ROOT
from foldkit.config import (
    ConfigError,
    RunConfig,
    canonical_tta,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from foldkit.io import FoldkitError
from foldkit.predict import tta_transforms
from foldkit.train import _Trainer, amp_dtype

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))


def test_precedence_defaults_then_yaml_then_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n  lr: 0.01\nseed: 7\n")
    cfg = load_config(path, [parse_override("train.epochs=2")])
    assert cfg.train.epochs == 2  # CLI beats YAML
    assert cfg.train.lr == 0.01 and cfg.seed == 7  # YAML beats defaults
    assert cfg.train.batch_size == RunConfig().train.batch_size  # defaults fill the rest


def test_cli_shortcuts_and_backbones_override_yaml() -> None:
    args = main.build_parser().parse_args(
        [
            "--config",
            "configs/demo.yaml",
            "--epochs",
            "3",
            "--batch=4",
            "--lr",
            "0.5",
            "--img-size",
            "48",
            "--seed",
            "9",
            "--workers",
            "1",
            "--device",
            "cpu",
            "--backbones",
            "a,b",
            "--set",
            "train.ema=true",
        ]
    )
    cfg = main.config_from_args(args)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.data.img_size) == (3, 4, 0.5, 48)
    assert (cfg.seed, cfg.data.workers, cfg.device, cfg.backbones, cfg.train.ema) == (
        9,
        1,
        "cpu",
        ["a", "b"],
        True,
    )


def test_unknown_yaml_key_names_file_and_closest_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.learning_rate'"):
        load_config(path)
    path.write_text("backbone: [a]\n")
    with pytest.raises(ConfigError, match="did you mean 'backbones'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=1.5", "train.epochs"),
        ("train.ema=1", "train.ema"),
        ("train.amp=fp8", "train.amp"),
        ("train.compile_mode=fast", "train.compile_mode"),
        ("tta=[hflip, spin]", "tta"),
        ("data.k=1", "data.k"),
        ("train.pos_weight=heavy", "pos_weight"),
        ("nonsense", "key=value"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [parse_override(override)])


def test_typed_values_parse_as_yaml() -> None:
    cfg = load_config(
        None,
        [
            parse_override(t)
            for t in (
                "train.lr=1e-3",
                "train.grad_clip=null",
                "tta=[hflip, vflip]",
                "pretrained_file={a: x.pt}",
                "train.pos_weight=2",
            )
        ],
    )
    assert cfg.train.lr == 1e-3 and cfg.train.grad_clip is None and cfg.tta == ["hflip", "vflip"]
    assert cfg.pretrained_file == {"a": "x.pt"} and cfg.train.pos_weight == 2.0


def test_round_trip_through_yaml_and_plain_data(tmp_path: Path) -> None:
    cfg = load_config(PROJECT_ROOT / "configs/default.yaml", [parse_override("train.epochs=3")])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg
    plain = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    assert plain == to_dict(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_real_timm_models(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.backbones
    for backbone in cfg.backbones:
        assert timm.is_model(backbone), backbone
    if path.stem == "demo":
        assert cfg.pretrained is False and cfg.device == "cpu"
    else:
        assert cfg.pretrained is True


def test_shipped_configs_are_the_expected_ones() -> None:
    assert {p.name for p in CONFIGS} >= {"default.yaml", "demo.yaml"}


def test_every_problem_of_a_file_is_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learnrate: 0.1\n  epochs: 1.5\n  batch_size: 0\nfoo: 1\ndata:\n  k: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 5 config problems:")
    for part in (
        "unknown config key 'train.learnrate'",
        "unknown config key 'foo'",
        "train.epochs: 1.5 does not fit type int",
        "train.batch_size: 0 is out of range",
        "data.k: 1 is out of range",
    ):
        assert part in message, part
    # one problem keeps the one-line form
    path.write_text("train:\n  epochs: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: train.epochs: 1.5 does not fit type int"


def test_a_section_with_every_key_commented_out_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain:\n#  epochs: 5\naugment:\n")
    cfg = load_config(path)
    assert cfg.seed == 3 and cfg.train == RunConfig().train and cfg.augment == RunConfig().augment


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("train.learning_rate", "train.lr"),
        ("lr", "train.lr"),
        ("train.bs", "train.batch_size"),
        ("batch", "train.batch_size"),
        ("train.epoch", "train.epochs"),
        ("data.size", "data.img_size"),
        ("image_size", "data.img_size"),
        ("data.num_workers", "data.workers"),
        ("data.folds", "data.k"),
        ("n_folds", "data.k"),
        ("train.img_size", "data.img_size"),
        ("model", "backbones"),
        ("data.seed", "data.fold_seed"),
        ("train.learnrate", "train.lr"),
    ],
)
def test_did_you_mean_knows_common_synonyms(typo: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{typo}'; did you mean '{meant}'"):
        parse_override(f"{typo}=1")


def test_zero_epochs_is_one_problem_and_rotate_is_checked(tmp_path: Path) -> None:
    """epochs 0 is the error; the warm-up fits any schedule of at least one epoch, so it is not named
    as a second, derived problem. A rotation is degrees either way, 0..180."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: train.epochs: 0 is out of range"
    path.write_text("train:\n  epochs: 2\n  warmup_epochs: 3\naugment:\n  rotate: -5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.warmup_epochs: 3.0 is out of range" in str(info.value)
    assert "augment.rotate: -5.0 is out of range" in str(info.value)


@pytest.mark.parametrize(
    ("capability", "amp", "expected"),
    [
        ((7, 5), "auto", torch.float16),  # T4: bf16 only emulated, though torch says it is supported
        ((6, 0), "auto", torch.float16),  # P100
        ((8, 0), "auto", torch.bfloat16),  # A100
        ((9, 0), "auto", torch.bfloat16),  # H100
        ((7, 5), "bf16", torch.bfloat16),  # asked for: as asked
        ((9, 0), "fp16", torch.float16),
        ((9, 0), "none", None),
    ],
)
def test_amp_auto_picks_bf16_only_where_the_gpu_runs_it_natively(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], amp: str, expected: torch.dtype | None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # its default: emulation too
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    cfg = load_config(PROJECT_ROOT / "configs" / "default.yaml", [parse_override(f"train.amp={amp}")])
    assert amp_dtype(cfg, torch.device("cuda", 0)) is expected
    assert amp_dtype(cfg, torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("capability", "dtype", "advice"),
    [
        ((7, 5), torch.float16, "--set train.amp=none (fp16 overflows past 65,504; this GPU has no native"),
        ((8, 0), torch.float16, "--set train.amp=bf16 (fp16 overflows past 65,504; bf16 does not)"),
        ((8, 0), torch.bfloat16, None),
    ],
)
def test_nan_advice_names_the_precision_this_gpu_has(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], dtype: torch.dtype, advice: str | None
) -> None:
    """After a NaN/inf under fp16, bf16 is the way out only on a GPU that has it natively (not T4)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    trainer = SimpleNamespace(dtype=dtype, device=torch.device("cuda", 0))
    text = _Trainer.way_out(trainer)  # type: ignore[arg-type]
    assert text.startswith("Try a lower train.lr or train.grad_clip")
    assert (advice in text) if advice else ("train.amp" not in text)


def test_canonical_tta_refuses_an_unknown_name() -> None:
    with pytest.raises(FoldkitError, match=r"unknown TTA \['hflp'\]"):
        canonical_tta(["hflp"])


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([], ["none"]),
        (["none"], ["none"]),
        (["vflip", "hflip"], ["hflip", "vflip"]),
        (["hflip", "none"], ["hflip"]),
        (["rot90", "hflip"], ["d4"]),  # ttach's d4 is hflip then rot90
        (["d4", "vflip"], ["d4"]),  # d4 alone is built, whatever else is listed
        (["rot90", "vflip", "hflip"], ["hflip", "vflip", "rot90"]),
    ],
)
def test_canonical_tta_spells_the_same_transforms_one_way(names: list[str], expected: list[str]) -> None:
    assert canonical_tta(names) == expected
    built, canon = tta_transforms(names), tta_transforms(expected)
    as_ops = [[(type(t).__name__, t.params) for t in c.aug_transforms] if c else [] for c in (built, canon)]
    assert as_ops[0] == as_ops[1]  # the same ttach transforms, in the same order
