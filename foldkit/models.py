"""timm model factory with an explicit, never-silent pretrained-weights policy.

``pretrained: true`` must mean pretrained: when the weights cannot be had (offline machine, no cache,
no local file) we stop with a message naming the offline options instead of quietly training from
scratch, which would waste a full GPU run and look like a bad recipe.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from foldkit.config import RunConfig
from foldkit.io import FoldkitError

log = logging.getLogger(__name__)


class PretrainedUnavailable(FoldkitError):
    """Pretrained weights were asked for and cannot be loaded."""


def pretrained_file_for(cfg: RunConfig, backbone: str) -> str | None:
    """The local weights file for ``backbone`` from ``pretrained_file`` (path, {backbone: path}, or
    a path with a ``{backbone}`` placeholder), or None."""
    spec = cfg.pretrained_file
    if spec is None:
        return None
    if isinstance(spec, dict):
        return spec.get(backbone)
    return spec.replace("{backbone}", backbone)


def _offline_help(backbone: str) -> str:
    return (
        f"pretrained weights for '{backbone}' cannot be loaded, and foldkit will not silently train "
        "from scratch. Offline options:\n"
        f"  1. a local file: --set pretrained_file=/path/to/{backbone}.safetensors (or a "
        "{backbone: path} mapping / a path with '{backbone}' in the config);\n"
        "  2. timm's Hugging Face cache: download once on a machine with internet "
        f"(python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\"), copy "
        "~/.cache/huggingface (or $HF_HOME) here and set HF_HUB_OFFLINE=1;\n"
        "  3. train from scratch on purpose: --set pretrained=false."
    )


def create_model(cfg: RunConfig, backbone: str, pretrained: bool | None = None) -> nn.Module:
    """A timm classifier with one logit. ``pretrained`` overrides the config (False when a
    checkpoint's weights will be loaded next anyway)."""
    use_pretrained = cfg.pretrained if pretrained is None else pretrained
    kwargs: dict = {"num_classes": 1}
    if cfg.train.drop_rate is not None:
        kwargs["drop_rate"] = cfg.train.drop_rate
    if cfg.train.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.train.drop_path_rate
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('.')[0][:8]}*")[:8]
        raise FoldkitError(
            f"unknown timm model '{backbone}'" + (f"; close: {', '.join(close)}" if close else "")
        )
    if not use_pretrained:
        return timm.create_model(backbone, pretrained=False, **kwargs)
    local = pretrained_file_for(cfg, backbone)
    if local is not None:
        if not Path(local).is_file():
            raise PretrainedUnavailable(
                f"pretrained_file for '{backbone}' not found: {local}\n" + _offline_help(backbone)
            )
        kwargs["pretrained_cfg_overlay"] = {"file": str(local)}
    try:
        model = timm.create_model(backbone, pretrained=True, **kwargs)
    except Exception as exc:  # timm raises RuntimeError/OSError/hub errors depending on the source
        raise PretrainedUnavailable(
            f"{_offline_help(backbone)}\n(cause: {type(exc).__name__}: {exc})"
        ) from exc
    log.info("%s: pretrained weights loaded%s", backbone, f" from {local}" if local else "")
    return model


def data_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own normalisation (timm's resolved data config), so pretrained weights see the
    statistics they were trained with."""
    dc = timm.data.resolve_data_config({}, model=model)
    return tuple(float(v) for v in dc["mean"]), tuple(float(v) for v in dc["std"])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a state dict saved by foldkit (strips torch.compile's ``_orig_mod.`` prefix)."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model
