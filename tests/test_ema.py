"""CachedEma must average exactly like timm's ModelEmaV3, only faster."""

from __future__ import annotations

import copy

import timm
import timm.utils
import torch

from foldkit.ema import CachedEma


def _train_steps(model: torch.nn.Module, emas: list, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        model(x).float().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for ema in emas:
            ema.update(model, step=step)


def test_cached_ema_is_bit_identical_to_timm() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=1).train()
    timm_ema = timm.utils.ModelEmaV3(model, decay=0.99, use_warmup=True)
    ours = CachedEma(model, decay=0.99, use_warmup=True)
    _train_steps(model, [timm_ema, ours], 6)
    a, b = timm_ema.module.state_dict(), ours.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the EMA really moved away from both the start and the model (a no-op would pass the above)
    bn_count = next(k for k in b if k.endswith("num_batches_tracked"))
    assert int(b[bn_count]) == 6
    w = next(k for k, v in b.items() if v.is_floating_point() and v.dim() == 4)
    assert not torch.equal(b[w], model.state_dict()[w])


def test_cached_ema_state_dict_holds_no_model_copy() -> None:
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=1)
    ema = CachedEma(model, decay=0.9)
    ema.update(model, step=3)
    assert all(k.startswith("module.") for k in ema.state_dict())


def test_cached_ema_follows_in_place_loads_and_a_new_model() -> None:
    """A resumed run loads weights in place (the pairing stays valid); another model object is
    paired anew rather than silently averaging the old one."""
    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=1)
    other = copy.deepcopy(model)
    ema = CachedEma(model, decay=0.0)  # decay 0: the EMA becomes the model it is given
    ema.update(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    model.load_state_dict(other.state_dict())
    ema.update(model)
    w = next(iter(dict(model.named_parameters())))
    assert torch.equal(ema.module.state_dict()[w], other.state_dict()[w])
    fresh = copy.deepcopy(other)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(2.0)
    ema.update(fresh)
    assert torch.equal(ema.module.state_dict()[w], fresh.state_dict()[w])
