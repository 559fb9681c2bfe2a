"""timm model factory with an explicit, never-silent pretrained-weights policy.

``pretrained: true`` must mean pretrained: when the weights cannot be had (offline machine, no cache,
no local file) we stop with a message naming the offline options instead of quietly training from
scratch, which would waste a full GPU run and look like a bad recipe.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from foldkit.config import RunConfig
from foldkit.io import FoldkitError

log = logging.getLogger(__name__)


#: How long the hub may take to accept a TCP connection before this process treats it as unreachable.
HUB_PROBE_SECONDS = 2.0


class PretrainedUnavailable(FoldkitError):
    """Pretrained weights were asked for and cannot be loaded: ``failures`` maps each backbone to why.

    One error can carry several backbones (``main.py`` checks them all before training), so the
    message's download command fetches every missing one at once.
    """

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = dict(failures)
        super().__init__(offline_help(self.failures))


def reachable(url: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``url``'s host and port opens within ``timeout`` seconds.

    Name resolution has no timeout of its own (a dead resolver takes ~10 s per try), so the probe runs
    in a daemon thread that is simply abandoned when it overruns.
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return False
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answer.append(True)
        except (OSError, ValueError):
            answer.append(False)

    thread = threading.Thread(target=probe, name="foldkit-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


@functools.cache
def hub_offline() -> str | None:
    """Why Hugging Face downloads are off in this process (``HF_HUB_OFFLINE`` is set, or the hub, or the
    HTTPS proxy in front of it, did not accept a connection within ``HUB_PROBE_SECONDS``), or None.

    Unreachable: huggingface_hub is switched to offline mode here, so a cached download is used at once
    and a missing one fails at once, instead of ~50 s of retries (5 per file, two file names) that end
    in the same error. Asked once per process; child processes inherit the variable.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    proxies = urllib.request.getproxies()
    target = proxies.get("https") or proxies.get("all") or constants.ENDPOINT
    if reachable(target):
        return None
    log.debug("%s did not answer within %.0f s: Hugging Face hub offline mode", target, HUB_PROBE_SECONDS)
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    return f"{target} is unreachable (no connection within {HUB_PROBE_SECONDS:.0f} s)"


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Keep huggingface_hub's per-retry warnings off the terminal (the failure itself is reported once,
    as ``PretrainedUnavailable``); ``--verbose`` lets them through."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    if not log.isEnabledFor(logging.DEBUG):
        hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def pretrained_file_for(cfg: RunConfig, backbone: str) -> str | None:
    """The local weights file for ``backbone`` from ``pretrained_file`` (path, {backbone: path}, or
    a path with a ``{backbone}`` placeholder), or None."""
    spec = cfg.pretrained_file
    if spec is None:
        return None
    if isinstance(spec, dict):
        return spec.get(backbone)
    return spec.replace("{backbone}", backbone)


def download_command(backbones: Sequence[str]) -> str:
    """A shell command that puts the pretrained weights of ``backbones`` into the Hugging Face cache."""
    return f'python -c "import timm; [timm.create_model(b, pretrained=True) for b in {list(backbones)}]"'


def offline_help(failures: dict[str, str]) -> str:
    """Why each backbone's weights failed, then the three ways out, naming every failing backbone."""
    names = list(failures)
    return "\n".join(
        [
            f"pretrained weights cannot be loaded for {', '.join(names)}, and foldkit will not silently "
            "train from scratch:",
            *(f"  {b}: {why}" for b, why in failures.items()),
            "Offline options:",
            "  1. local files: --set pretrained_file=/path/to/{backbone}.safetensors (a path with "
            "'{backbone}' in it, or a {backbone: path} mapping in the config);",
            f"  2. timm's Hugging Face cache: on a machine with internet run {download_command(names)}, "
            "copy ~/.cache/huggingface (or $HF_HOME) here and set HF_HUB_OFFLINE=1;",
            "  3. train from scratch on purpose: --set pretrained=false.",
        ]
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
        return fp32_head(timm.create_model(backbone, pretrained=False, **kwargs))
    local = pretrained_file_for(cfg, backbone)
    if local is not None:
        if not Path(local).is_file():
            raise PretrainedUnavailable({backbone: f"pretrained_file not found: {local}"})
        kwargs["pretrained_cfg_overlay"] = {"file": str(local)}
    offline = hub_offline() if local is None else None
    try:
        with _quiet_hub():
            model = timm.create_model(backbone, pretrained=True, **kwargs)
    except Exception as exc:  # timm raises RuntimeError/OSError/hub errors depending on the source
        cause = f"{type(exc).__name__}: {exc}"
        if offline:
            cause = f"not in the local Hugging Face cache, and {offline}"
        raise PretrainedUnavailable({backbone: cause}) from exc
    log.info("%s: pretrained weights loaded%s", backbone, f" from {local}" if local else "")
    return fp32_head(model)


class _Fp32Forward:
    """Mixin put in front of a classifier's own class: its forward runs outside autocast, on float32."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), *args, **kwargs)  # type: ignore[misc]


@functools.cache
def _fp32_class(cls: type[nn.Module]) -> type[nn.Module]:
    """One subclass per head class (cached, so every model of a backbone shares it)."""
    return type(f"Fp32{cls.__name__}", (_Fp32Forward, cls), {"__module__": __name__})


def fp32_head(model: nn.Module) -> nn.Module:
    """Make the model's final classifier (timm's ``get_classifier()``) compute in float32.

    Why: under bf16 autocast the single logit is rounded to 8 bits of mantissa, so many images tie
    at the same probability and the F1 threshold and rank blends lose resolution. Only the head runs
    in fp32 (a negligible cost). The head's class is swapped in place rather than wrapped, so the
    state_dict keys stay those of the plain timm model (old checkpoints load, new ones load without
    foldkit), and a ``deepcopy`` (timm's EMA) keeps the fp32 head. Training and prediction both get
    their models here, so they follow the same path.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        log.debug("%s: no classifier module to run in fp32", type(model).__name__)
        return model
    if not isinstance(head, _Fp32Forward):
        head.__class__ = _fp32_class(type(head))
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
