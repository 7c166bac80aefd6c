"""Twin models for numeric parity with Hugging Face PEFT: the same tiny base adapted by both.

``twins(make, peft_config, our_config)`` builds the base twice, adapts one copy with ``peft`` and
one with peftreg, draws PEFT's trainable tensors at random (PEFT starts some factors at zero or
the identity, which would hide errors) and copies them into peftreg's tensors of the same key.
peftreg's saved keys are ``<module path>.<PEFT leaf name>``, so the copy needs no table: a key
that does not line up, or a shape that differs, fails the test.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from tolerances import tol

import peftreg
from peftreg.plugin import iter_slots


def peft_trainable(peft_model) -> dict[str, torch.nn.Parameter]:
    """PEFT's trainable tensors keyed as peftreg saves them (no prefix, no adapter name)."""
    named = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            named[key] = p
    return named


def our_trainable(model, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """peftreg's adapter parameters keyed ``<module path>.<parameter name>``."""
    named = {}
    for path, slot in iter_slots(model.model):
        if adapter in slot.adapter_names():
            for name, p in slot.adapter_module(adapter).named_parameters():
                named[f"{path}.{name}"] = p
    return named


def twins(make: Callable[[], torch.nn.Module], peft_config, our_config, *, scale: float = 0.2,
          seed: int = 0):
    """``(peft_model, our_model)`` with equal, random adapter tensors; both in eval mode."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT's notes on its own defaults
        theirs = peft.get_peft_model(make(), peft_config)
    ours = peftreg.adapt(make(), our_config)
    theirs_p, ours_p = peft_trainable(theirs), our_trainable(ours)
    assert sorted(theirs_p) == sorted(ours_p), (sorted(theirs_p), sorted(ours_p))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in theirs_p.items():
            assert ours_p[key].shape == p.shape, key
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            ours_p[key].copy_(p)
    # Saved keys are exactly PEFT's (without its prefix and adapter name).
    assert sorted(ours.adapter_state_dict("default")) == sorted(theirs_p)
    return theirs.eval(), ours.eval()


def compare(theirs, ours, ids, loss: Callable, *, check: str = "peft_parity") -> dict[str, float]:
    """Check logits and the gradients of every adapter tensor; return the max differences."""
    out_t, out_o = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(out_o, out_t, **tol(check, torch.float32))
    loss(theirs, ids).backward()
    loss(ours, ids).backward()
    theirs_p, ours_p = peft_trainable(theirs), our_trainable(ours)
    grad_diff = 0.0
    for key, p in theirs_p.items():
        assert p.grad is not None and ours_p[key].grad is not None, key
        assert p.grad.abs().max() > 0, f"{key}: no gradient reaches PEFT's tensor"
        torch.testing.assert_close(ours_p[key].grad, p.grad, **tol(check, torch.float32),
                                   msg=lambda m, k=key: f"{k}: {m}")
        grad_diff = max(grad_diff, float((ours_p[key].grad - p.grad).abs().max()))
    return {"logits": float((out_o - out_t).detach().abs().max()), "grad": grad_diff}


def compare_merged(theirs, ours, ids, make: Callable[[], torch.nn.Module], *,
                   check: str = "peft_parity") -> dict[str, float]:
    """Merge both, compare logits; unmerge ours and check the base weights (those of a fresh
    ``make()``) come back."""
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        theirs.merge_adapter()
        ours.merge()
        merged_t, merged_o = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(merged_o, merged_t, **tol(check, torch.float32))
    torch.testing.assert_close(merged_o, unmerged, **tol(check, torch.float32))
    ours.unmerge()
    fresh = make().state_dict()
    worst, seen = 0.0, 0
    for key, w in ours.model.state_dict().items():
        if key.endswith(".base.weight"):  # an adapted module's base, held by its host
            original = fresh[key.replace(".base.weight", ".weight")]
            torch.testing.assert_close(w, original, **tol(check, torch.float32),
                                       msg=lambda m, k=key: f"{k}: {m}")
            worst, seen = max(worst, float((w - original).abs().max())), seen + 1
    assert seen > 0, "no adapted base weight found"
    return {"merged": float((merged_o - merged_t).abs().max()), "unmerge": worst}


class TinyConvs(torch.nn.Module):
    """A tiny convolutional model (same weights on every build): a padded 3x3 convolution, a
    strided grouped one and a 1x1 one without bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(21)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 6, 3, stride=2, groups=2)
        self.c3 = torch.nn.Conv2d(6, 4, 1, bias=False)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def compare_convs(peft_config, our_config, *, scale: float = 0.3) -> None:
    """PEFT and peftreg on :class:`TinyConvs`: outputs, gradients, merged outputs, unmerge."""
    import peft

    theirs = peft.get_peft_model(TinyConvs(), peft_config).eval()
    ours = peftreg.adapt(TinyConvs(), our_config).eval()
    theirs_p, ours_p = peft_trainable(theirs), our_trainable(ours)
    assert sorted(theirs_p) == sorted(ours_p), (sorted(theirs_p), sorted(ours_p))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, p in theirs_p.items():
            assert ours_p[key].shape == p.shape, key
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            ours_p[key].copy_(p)
    x = torch.randn(2, 3, 9, 9, generator=gen)
    close = tol("peft_parity", torch.float32)
    out_t, out_o = theirs(x), ours(x)
    torch.testing.assert_close(out_o, out_t, **close)
    out_t.square().mean().backward()
    out_o.square().mean().backward()
    for key, p in theirs_p.items():
        torch.testing.assert_close(ours_p[key].grad, p.grad, **close)
    with torch.no_grad():
        theirs.merge_adapter()
        ours.merge()
        torch.testing.assert_close(ours(x), theirs(x), **close)
    ours.unmerge()
    fresh = TinyConvs()
    for name in ("c1", "c2", "c3"):
        torch.testing.assert_close(ours.model.get_submodule(name).base.weight,
                                   fresh.get_submodule(name).weight, **close)
