# SPDX-License-Identifier: Apache-2.0
"""PagedAdamW(state_bits=8): blockwise 8-bit moments (issue 17).

The oracles are written here in plain PyTorch, independent of the library: the dynamic maps
decoded from their bit patterns (Dettmers et al. 2022, dynamic tree quantization), a blockwise
nearest-code quantizer (torch.bucketize over the midpoints), and AdamW in float64 whose moments
are quantized and decoded after every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from peftreg.errors import ConfigError
from peftreg.optim import PagedAdamW, load_optimizer, save_optimizer
from peftreg.optim.checkpoint import read_optimizer_state
from peftreg.optim.quant8 import dequantize_blockwise, dynamic_map

BLOCK = 256
PAGE = 4096  # 7 blocks (1792 elements) per 8-bit page: the shapes below straddle pages
# Odd sizes, partial last blocks, one element, exact blocks, several pages.
SHAPES = [(37, 5), (700,), (3, 129), (1,), (2600,), (8, 64), (256,)]
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
BUDGETS = {"unlimited": None, "five_percent": 0.05}


# -- the oracles ---------------------------------------------------------------------------

def reference_map(signed: bool) -> torch.Tensor:
    """Decode every byte as a dynamic-tree code: [sign] zeros(e) 1 fraction, value
    +-10**-e * (midpoint of the fraction's bin of [0.1, 1]); the patterns without an indicator
    bit are 0 and 1.0. The unsigned map uses the sign bit as the lowest fraction bit."""
    values = []
    for b in range(256):
        if signed:
            negative, rest, extra, extra_bits = b >> 7, b & 0x7F, 0, 0
        else:
            negative, rest, extra, extra_bits = 0, b >> 1, b & 1, 1
        if rest == 0:
            values.append(1.0 if (negative or extra) else 0.0)
            continue
        e = 7 - rest.bit_length()
        fraction_bits = 6 - e
        k = ((rest & ((1 << fraction_bits) - 1)) << extra_bits) | extra
        bins = 2 ** (fraction_bits + extra_bits)
        value = 10.0**-e * (0.1 + 0.9 * (k + 0.5) / bins)
        values.append(-value if negative else value)
    return torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)


def ref_quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (count of midpoints strictly below x / absmax) and per-block absmax, computed in
    x's dtype; the midpoints are float32 like the map."""
    flat = x.reshape(-1)
    n = flat.numel()
    padded = torch.cat([flat, flat.new_zeros((-n) % BLOCK)]).reshape(-1, BLOCK)
    absmax = padded.abs().amax(dim=1)
    div = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    mids = ((qmap[:-1] + qmap[1:]) / 2).to(x.dtype)
    # The reciprocal once per block, as bitsandbytes; a division where it would overflow.
    scale = 1 / div
    finite = torch.isfinite(scale)[:, None]
    normalized = torch.where(finite, padded * scale[:, None], padded / div[:, None])
    codes = torch.bucketize(normalized, mids, right=False)
    return codes.reshape(-1)[:n].to(torch.uint8).reshape(x.shape), absmax


def ref_dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1).long()
    scale = absmax.repeat_interleave(BLOCK)[:flat.numel()]
    return (qmap.to(absmax.dtype)[flat] * scale).reshape(codes.shape)


class ReferenceAdamW8:
    """AdamW (Loshchilov & Hutter, torch's conventions) in float64 with both moments stored
    blockwise-quantized: decoded at the start of each step, encoded at its end."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.maps = (reference_map(True), reference_map(False))
        zero_codes = lambda p: torch.zeros(p.shape, dtype=torch.uint8)  # noqa: E731
        zero_absmax = lambda p: torch.zeros(-(-p.numel() // BLOCK), dtype=torch.float64)  # noqa: E731
        self.state = [{"m": (zero_codes(p), zero_absmax(p)), "v": (zero_codes(p), zero_absmax(p))}
                      for p in self.params]
        self.t = [0] * len(self.params)

    def moments(self, i):
        m = ref_dequantize(*self.state[i]["m"], self.maps[0])
        v = ref_dequantize(*self.state[i]["v"], self.maps[1])
        return m, v

    @torch.no_grad()
    def step(self):
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            self.t[i] += 1
            t = self.t[i]
            m, v = self.moments(i)
            g = p.grad.double()
            x = p.double() * (1 - self.lr * self.wd)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            x = x - self.lr / (1 - beta1**t) * m / (v.sqrt() / math.sqrt(1 - beta2**t) + self.eps)
            p.copy_(x.to(p.dtype))
            self.state[i] = {"m": ref_quantize(m, self.maps[0]),
                             "v": ref_quantize(v, self.maps[1])}


# -- helpers -------------------------------------------------------------------------------

def _params(device, dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]


def _grads(step, params):
    """Deterministic gradients of varied scale; parameter 3 gets none on every third step."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * (10.0 ** ((i % 3) - 1))
        out.append(None if (i == 3 and step % 3 == 0) else g.to(p.device, p.dtype))
    return out


def _run(optimizer, params, start, steps):
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()


def _paged8(params, budget=None, **kwargs):
    return PagedAdamW(params, **HYPER, page_bytes=PAGE, budget_fraction=budget, state_bits=8,
                      **kwargs)


# -- the maps and the quantizer ------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_equals_bit_pattern_decoding(signed):
    ours, ref = dynamic_map(signed), reference_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, ref)
    assert torch.all(ours[1:] > ours[:-1])  # 256 distinct values
    assert ours[-1] == 1.0 and 0.0 in ours.tolist()
    if signed:
        assert ours[0].item() == pytest.approx(-0.99296875)
        assert (ours < 0).sum() == 127 and (ours > 0).sum() == 128
        assert ours[ours > 0].min().item() == pytest.approx(0.55e-6)
    else:
        assert ours[0] == 0.0 and ours[1].item() == pytest.approx(0.325e-6)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_matches_bitsandbytes_where_installed(signed):
    """The peer's map (bitsandbytes.functional.create_dynamic_map, the maps its AdamW8bit
    uses), where bitsandbytes is importable: equal to within float32 rounding (bitsandbytes
    builds its bins with float32 linspace, we in float64)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    theirs = functional.create_dynamic_map(signed=signed).float()
    ours = dynamic_map(signed)
    torch.testing.assert_close(ours, theirs, rtol=3e-7, atol=0)


def _quantizer(require_pool):
    opt = PagedAdamW([torch.nn.Parameter(torch.zeros(1))], page_bytes=PAGE, state_bits=8)
    return opt


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 1000, 4097])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_equals_reference(require_pool, n, signed):
    opt = _quantizer(require_pool)
    gen = torch.Generator().manual_seed(n)
    # Values over many decades, as moments have; one all-zero block when there are several.
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)
    if not signed:
        x = x.abs()
    if n > 2 * BLOCK:
        x[BLOCK:2 * BLOCK] = 0
    qmap = dynamic_map(signed)
    codes, absmax = opt.pool.quantize8(x, signed=signed)
    ref_codes, ref_absmax = ref_quantize(x, qmap)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (-(-n // BLOCK),)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    decoded = dequantize_blockwise(codes, absmax, qmap)
    assert torch.equal(decoded, ref_dequantize(ref_codes, ref_absmax, qmap))
    # Round trip error: at most half the widest gap between neighbouring codes (or the
    # distance from -1 to the lowest signed code, 1 - 0.99296875), times the block's absmax.
    half_gap = max((qmap[1:] - qmap[:-1]).max().item() / 2, 1 + qmap[0].item())
    scale = absmax.repeat_interleave(BLOCK)[:n]
    assert torch.all((decoded - x).abs() <= half_gap * scale * (1 + 1e-5))
    if n > 2 * BLOCK:
        assert torch.all(absmax[1] == 0) and torch.all(decoded[BLOCK:2 * BLOCK] == 0)
    # Twin: the codes carry the information (a random block does not decode to x).
    assert not torch.equal(dequantize_blockwise(torch.zeros_like(codes), absmax, qmap), x)
    opt.close()


def _straddlers(qmap: torch.Tensor, absmax: float) -> torch.Tensor:
    """float32 values whose x * (1 / absmax) and x / absmax fall on opposite sides of a
    midpoint: the values where the encoder's order of operations decides the code."""
    mids = ((qmap[:-1] + qmap[1:]) / 2).float()
    centre = (mids * absmax).float()
    steps = torch.arange(-6, 7, dtype=torch.int32)
    bits = centre.view(torch.int32)[:, None] + steps[None, :]
    x = bits.view(torch.float32).reshape(-1)
    a = torch.tensor(absmax, dtype=torch.float32)
    by_mul = torch.bucketize(x * (1 / a), mids)
    by_div = torch.bucketize(x / a, mids)
    return x[(by_mul != by_div) & (x.abs() < absmax)]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_encoder_multiplies_by_the_reciprocal_as_bitsandbytes(require_pool, signed):
    opt = _quantizer(require_pool)
    qmap = dynamic_map(signed)
    absmax = 3.0  # 1/3 is inexact in float32, so the two orders round differently
    straddle = _straddlers(qmap, absmax)
    assert straddle.numel() > 10  # the case exists for this map and absmax
    x = torch.cat([torch.tensor([absmax]), straddle[:BLOCK - 1]])
    codes, _ = opt.pool.quantize8(x, signed=signed)
    assert torch.equal(codes, ref_quantize(x, qmap)[0])
    divided = torch.bucketize(x / absmax, ((qmap[:-1] + qmap[1:]) / 2).float())
    assert not torch.equal(codes.long(), divided)
    # An absmax without a finite reciprocal (subnormal): that block divides instead.
    tiny = torch.tensor([2.0**-140, -2.0**-141, 2.0**-143, 0.0])
    tiny = tiny if signed else tiny.abs()
    assert torch.isinf(1 / tiny.abs().max())
    tiny_codes, tiny_absmax = opt.pool.quantize8(tiny, signed=signed)
    assert tiny_absmax.item() == 2.0**-140 and tiny_codes[0] == 255
    assert torch.equal(tiny_codes, ref_quantize(tiny, qmap)[0])
    opt.close()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_ties_go_to_the_lower_code_and_extremes_are_exact(require_pool, signed):
    opt = _quantizer(require_pool)
    qmap = dynamic_map(signed)
    mids = (qmap[:-1] + qmap[1:]) / 2
    # absmax 1: each midpoint is exactly between two codes after the division.
    x = torch.cat([torch.ones(1), mids, qmap])
    codes, absmax = opt.pool.quantize8(x, signed=signed)
    assert absmax[0] == 1.0 and absmax[-1] == 1.0
    assert codes[0] == 255  # 1.0 is the top code
    assert torch.equal(codes[1:256].long(), torch.arange(255))  # midpoint j -> code j
    assert torch.equal(codes[256:].long(), torch.arange(256))   # codes map to themselves
    assert torch.equal(codes, ref_quantize(x, qmap)[0])
    if signed:
        # A block whose extreme is negative: -absmax goes to the most negative code.
        y = torch.tensor([-3.0, 1.5, 0.0, -1e-9])
        c, a = opt.pool.quantize8(y, signed=True)
        assert a.item() == 3.0 and c[0] == 0 and c[2] == torch.nonzero(qmap == 0).item()
        assert torch.equal(c, ref_quantize(y, qmap)[0])
    opt.close()


# -- the update ----------------------------------------------------------------------------

@pytest.mark.parametrize("budget", BUDGETS.values(), ids=[f"budget={k}" for k in BUDGETS])
def test_update_equals_float64_reference_with_quantized_states(paged_device, budget):
    ours, ref_params = _params(paged_device), _params("cpu")
    opt = _paged8(ours, budget)
    ref = ReferenceAdamW8(ref_params, **HYPER)
    steps = 25
    _run(opt, ours, 0, steps)
    _run(ref, ref_params, 0, steps)
    start = _params("cpu")
    state = opt.state_dict(quantized=True)["state"]
    for i, (a, b) in enumerate(zip(ours, ref_params, strict=True)):
        # Moved by ~steps * lr; agreement far tighter than that (a code that lands on the
        # other side of a midpoint in float32 vs float64 moves an update by ~1% of lr).
        assert (b - start[i]).abs().max() > 0.005
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=2e-4)
        for key, (codes, absmax) in ref.state[i].items():
            name = "exp_avg" if key == "m" else "exp_avg_sq"
            ours_codes = state[i][f"{name}_codes"].cpu()
            assert (ours_codes == codes).float().mean() >= 0.99, (i, name)
            torch.testing.assert_close(state[i][f"{name}_absmax"].cpu().double(), absmax,
                                       rtol=2e-2, atol=0)
    assert state[3]["step"].item() == ref.t[3] < steps  # own step count (missing grads)
    opt.close()


def test_update_of_half_precision_params(paged_device):
    for dtype in (torch.bfloat16, torch.float16):
        ours, ref_params = _params(paged_device, dtype), _params("cpu", dtype)
        opt = _paged8(ours, 0.05)
        ref = ReferenceAdamW8(ref_params, **HYPER)
        _run(opt, ours, 0, 10)
        _run(ref, ref_params, 0, 10)
        for a, b in zip(ours, ref_params, strict=True):
            assert a.dtype == dtype
            # Within about one rounding of the parameter's dtype.
            torch.testing.assert_close(a.cpu().float(), b.float(), rtol=1e-2, atol=2e-2)
        opt.close()


def test_paging_does_not_change_the_result(paged_device):
    results = []
    for budget in (None, 0.05):
        params = _params(paged_device)
        opt = _paged8(params, budget)
        _run(opt, params, 0, 12)
        if budget is not None:
            c = opt.counters()
            assert c["pages_out"] > 0 and c["peak_resident_bytes"] <= c["budget_bytes"] + PAGE
        results.append([p.detach().cpu().clone() for p in params])
        opt.close()
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_state_bytes_per_parameter(require_pool):
    """The benchmark's LoRA set (96 adapters of r=16 on 1024-wide layers, 3.1M elements) at
    the default page size: codes 2 + absmax 2 * 4 / 256 bytes, plus the last page's slack."""
    shapes = [(16, 1024), (1024, 16)] * 96
    params = _params("cpu", shapes=shapes)
    numel = sum(p.numel() for p in params)
    eight = PagedAdamW(params, state_bits=8)
    thirty_two = PagedAdamW(params)
    per_param = {bits: (o.counters()["num_pages"] * o.counters()["page_bytes"]) / numel
                 for bits, o in ((8, eight), (32, thirty_two))}
    assert per_param[8] <= 2.1, per_param
    assert per_param[32] >= 8.0, per_param
    # The budget fraction is of the 8-bit state: a quarter keeps a quarter resident.
    quarter = PagedAdamW(params, state_bits=8, budget_fraction=0.25)
    _run(quarter, params, 0, 1)
    assert quarter.counters()["peak_resident_bytes"] <= 0.25 * per_param[8] * numel + 1
    for o in (eight, thirty_two, quarter):
        o.close()


def test_training_loss_within_one_percent_of_fp32_adamw(require_pool):
    """A small MLP regression (512 examples, batches of 64, 300 steps, lr 3e-3): the final
    training loss of 8-bit PagedAdamW (paged, 30% budget) is within 1% of torch.optim.AdamW's,
    and both far below the starting loss. (Seeds 0-3 of this setup give 0.3-0.8%.)"""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 16, generator=gen)
    targets = torch.sin(inputs @ torch.randn(16, 4, generator=gen))

    def train(make_opt):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 4))
        loss_of = lambda: torch.nn.functional.mse_loss(model(inputs), targets).item()  # noqa: E731
        with torch.no_grad():
            first = loss_of()
        opt = make_opt(model.parameters())
        for step in range(300):
            batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
            loss = torch.nn.functional.mse_loss(model(inputs[batch]), targets[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            final = loss_of()
        if isinstance(opt, PagedAdamW):
            opt.close()
        return first, final

    first, fp32 = train(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    _, eight = train(lambda ps: PagedAdamW(ps, lr=3e-3, state_bits=8, page_bytes=PAGE,
                                           budget_fraction=0.3))
    assert fp32 < 0.5 * first
    assert abs(eight - fp32) / fp32 < 0.01, (eight, fp32)


# -- state dicts and checkpoints -----------------------------------------------------------

def test_torch_layout_loads_into_torch_adamw(paged_device):
    ours = _params(paged_device)
    opt = _paged8(ours, 0.05)
    _run(opt, ours, 0, 7)
    sd = opt.state_dict()
    quantized = opt.state_dict(quantized=True)
    maps = (dynamic_map(True), dynamic_map(False))
    for index, entry in sd["state"].items():
        assert entry["exp_avg"].dtype == torch.float32
        assert entry["exp_avg"].shape == ours[index].shape
        q = quantized["state"][index]
        assert torch.equal(entry["exp_avg"].cpu(), ref_dequantize(
            q["exp_avg_codes"].cpu(), q["exp_avg_absmax"].cpu(), maps[0]))
        assert torch.equal(entry["exp_avg_sq"].cpu(), ref_dequantize(
            q["exp_avg_sq_codes"].cpu(), q["exp_avg_sq_absmax"].cpu(), maps[1]))
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    torch_opt = torch.optim.AdamW(theirs, **HYPER)
    torch_opt.load_state_dict(sd)
    for index, p in enumerate(theirs):
        assert torch.equal(torch_opt.state[p]["exp_avg"], sd["state"][index]["exp_avg"])
    _run(torch_opt, theirs, 7, 3)
    _run(opt, ours, 7, 3)
    for a, b in zip(ours, theirs, strict=True):
        # Same moments to start with; 3 more steps differ only by 8-bit storage.
        torch.testing.assert_close(a, b, rtol=0, atol=5e-4)
    # ... and torch's dict loads into an 8-bit optimizer (encoded on the way in).
    again = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt2 = _paged8(again, 0.05)
    opt2.load_state_dict(torch_opt.state_dict())
    for index, entry in opt2.state_dict()["state"].items():
        expected = torch_opt.state_dict()["state"][index]
        for key in ("exp_avg", "exp_avg_sq"):
            absmax = expected[key].abs().max()
            torch.testing.assert_close(entry[key].cpu(), expected[key].cpu(), rtol=0,
                                       atol=0.0071 * absmax.item())
        assert entry["step"].item() == expected["step"].item()
    opt.close()
    opt2.close()


def test_torch_layout_round_trip_is_stable(paged_device):
    """ours -> torch layout -> ours: decoded moments equal to within a code's rounding once,
    and a second trip changes nothing more than the first."""
    ours = _params(paged_device)
    opt = _paged8(ours)
    _run(opt, ours, 0, 5)
    first = opt.state_dict()
    opt2 = _paged8([torch.nn.Parameter(p.detach().clone()) for p in ours])
    opt2.load_state_dict(first)
    second = opt2.state_dict()
    for index, entry in first["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = entry[key], second["state"][index][key]
            torch.testing.assert_close(b, a, rtol=0, atol=0.0071 * a.abs().max().item())
    opt.close()
    opt2.close()


@pytest.mark.parametrize("save_budget,load_budget", [(0.05, None), (None, 0.05)],
                         ids=["paged-to-unlimited", "unlimited-to-paged"])
def test_quantized_checkpoint_resumes_bit_for_bit(paged_device, tmp_path, save_budget,
                                                  load_budget):
    uninterrupted = _params(paged_device)
    opt = _paged8(uninterrupted, save_budget)
    _run(opt, uninterrupted, 0, 8)
    path = save_optimizer(opt, tmp_path / "opt.safetensors")
    saved = read_optimizer_state(path)
    assert saved["state"][0]["exp_avg_codes"].dtype == torch.uint8
    assert "exp_avg" not in saved["state"][0]
    saved_params = [p.detach().clone() for p in uninterrupted]
    _run(opt, uninterrupted, 8, 8)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = _paged8(resumed, load_budget)
    load_optimizer(opt2, path)
    _run(opt2, resumed, 8, 8)
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(a, b)
    # Twin: the torch layout (decoded, then encoded again) does not resume bit for bit.
    again = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt3 = _paged8(again, load_budget)
    opt4 = _paged8([torch.nn.Parameter(p.clone()) for p in saved_params], load_budget)
    load_optimizer(opt4, path)
    opt3.load_state_dict(opt4.state_dict())
    _run(opt3, again, 8, 8)
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted, again, strict=True))
    for o in (opt, opt2, opt3, opt4):
        o.close()


def test_checkpoint_is_a_quarter_of_fp32(require_pool, tmp_path):
    params = _params("cpu", shapes=[(64, 1024)])
    sizes = {}
    for bits in (32, 8):
        opt = PagedAdamW(params, state_bits=bits)
        _run(opt, params, 0, 1)
        sizes[bits] = save_optimizer(opt, tmp_path / f"o{bits}.safetensors").stat().st_size
        opt.close()
    assert sizes[8] < 0.27 * sizes[32], sizes


def test_quantized_dict_loads_into_32_bit_states(paged_device):
    ours = _params(paged_device)
    opt = _paged8(ours, 0.05)
    _run(opt, ours, 0, 4)
    fp32 = PagedAdamW([torch.nn.Parameter(p.detach().clone()) for p in ours], **HYPER,
                      page_bytes=PAGE)
    fp32.load_state_dict(opt.state_dict(quantized=True))
    for index, entry in fp32.state_dict()["state"].items():
        expected = opt.state_dict()["state"][index]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(entry[key], expected[key])
    opt.close()
    fp32.close()


def test_bad_arguments_and_dicts(require_pool):
    p = [torch.nn.Parameter(torch.zeros(300))]
    with pytest.raises(ConfigError, match="state_bits must be 32 or 8"):
        PagedAdamW(p, state_bits=4)
    fp32 = PagedAdamW(p)
    with pytest.raises(ConfigError, match="quantized=True"):
        fp32.state_dict(quantized=True)
    opt = PagedAdamW(p, state_bits=8)
    p[0].grad = torch.ones(300)
    opt.step()
    sd = opt.state_dict(quantized=True)
    bad_map = {**sd, "state": {0: {**sd["state"][0], "quant_map": "other"}}}
    with pytest.raises(ValueError, match="quantized with map 'other'"):
        opt.load_state_dict(bad_map)
    short = {**sd, "state": {0: {**sd["state"][0], "exp_avg_absmax": torch.zeros(1)}}}
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.load_state_dict(short)
    fp32.close()
    opt.close()


def test_maximize_equals_negated_gradients_and_groups_keep_their_lr(paged_device):
    groups = lambda ps: [{"params": ps[:3], "lr": 3e-3}, {"params": ps[3:]}]  # noqa: E731
    a, b = _params(paged_device), _params(paged_device)
    opt_a = PagedAdamW(groups(a), lr=1e-2, maximize=True, page_bytes=PAGE, state_bits=8)
    opt_b = PagedAdamW(groups(b), lr=1e-2, page_bytes=PAGE, state_bits=8)
    for step in range(6):
        for pa, pb, g in zip(a, b, _grads(step, a), strict=True):
            pa.grad = None if g is None else g.clone()
            pb.grad = None if g is None else -g
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
    # Twin: the group's lr matters (the first group moved less than it would at 1e-2).
    c = _params(paged_device)
    opt_c = PagedAdamW(c, lr=1e-2, page_bytes=PAGE, state_bits=8)
    for step in range(6):
        for pc, g in zip(c, _grads(step, c), strict=True):
            pc.grad = None if g is None else -g
        opt_c.step()
    assert not torch.equal(c[0], b[0]) and torch.equal(c[4], b[4])
    for o in (opt_a, opt_b, opt_c):
        o.close()


# -- the CPU kernels of the step (chosen at run time; all bit-identical) ---------------------

def _hard_values() -> torch.Tensor:
    """Values where an encoder can go wrong: every midpoint of both maps and its float32
    neighbours (ties go to the lower code), the map values, +-0, NaN, tiny and extreme
    magnitudes, and random values over many decades; a partial last block."""
    parts = []
    for signed in (True, False):
        qmap = dynamic_map(signed)
        mids = (qmap[:-1] + qmap[1:]) / 2
        parts += [mids, torch.nextafter(mids, torch.tensor(2.0)),
                  torch.nextafter(mids, torch.tensor(-2.0)), qmap]
    parts.append(torch.tensor([0.0, -0.0, float("nan"), 1e-30, -1e-30, 1e-45, 1.0, -1.0]))
    gen = torch.Generator().manual_seed(7)
    parts.append(torch.randn(4000, generator=gen) * torch.exp(torch.randn(4000, generator=gen) * 6))
    x = torch.cat(parts)
    # A 1.0 opens every block, so the block's absmax is 1 and the midpoints stay ties.
    x = torch.cat([torch.cat([torch.ones(1), c]) for c in x.split(BLOCK - 1)])
    x = x[: (x.numel() // BLOCK) * BLOCK + 77]
    x[-77 - BLOCK::37] = float("nan")  # NaN inside a block, not only at its start
    return x


def _kernels(opt) -> list[str]:
    kernels = opt.pool.quant8_kernels()
    assert kernels[0] == "scalar" and opt.pool.quant8_kernel() == kernels[-1]  # auto: fastest
    return kernels


def test_every_kernel_encodes_bit_identically(require_pool):
    opt = _quantizer(require_pool)
    maps = (dynamic_map(True), dynamic_map(False))
    x = _hard_values()
    results = {}
    for kernel in _kernels(opt):
        opt.pool.set_quant_maps(*maps, kernel=kernel)
        assert opt.pool.quant8_kernel() == kernel
        results[kernel] = [opt.pool.quantize8(x, signed=s) for s in (True, False)]
    for i, signed in enumerate((True, False)):
        finite = ~torch.isnan(x)  # bucketize sorts NaN above every midpoint; the encoders do not
        ref_codes, _ = ref_quantize(torch.where(finite, x, 0.0), maps[i])
        for kernel, out in results.items():
            codes, absmax = out[i]
            assert torch.equal(codes, results["scalar"][i][0]), kernel
            assert torch.equal(absmax, results["scalar"][i][1]), kernel
            # The oracle on the NaN-free blocks (a NaN leaves its block's absmax finite).
            clean = torch.tensor([bool(finite[b:b + BLOCK].all())
                                  for b in range(0, x.numel(), BLOCK)])
            keep = clean.repeat_interleave(BLOCK)[: x.numel()]
            assert keep.sum() > x.numel() // 2
            assert torch.equal(codes[keep], ref_codes[keep]), (kernel, signed)
    opt.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_every_kernel_steps_bit_identically(require_pool, dtype):
    maps = (dynamic_map(True), dynamic_map(False))

    def run(kernel):
        params = _params("cpu", dtype)
        opt = _paged8(params)
        opt.pool.set_quant_maps(*maps, kernel=kernel)
        _run(opt, params, 0, 4)
        state = opt.state_dict(quantized=True)
        out = [p.detach().clone() for p in params], state
        opt.close()
        return out

    probe = _quantizer(require_pool)
    kernels = _kernels(probe)
    probe.close()
    ref_params, ref_state = run("scalar")
    for kernel in kernels[1:]:
        params, state = run(kernel)
        for a, b in zip(ref_params, params, strict=True):
            assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               b.view(torch.int16 if dtype != torch.float32 else torch.int32)), \
                kernel
        for key, entry in ref_state["state"].items():
            for name, value in entry.items():
                other = state["state"][key][name]
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other), (kernel, name)
                else:
                    assert value == other, (kernel, name)


def test_every_kernel_steps_bit_identically_across_odd_blocks(require_pool):
    """Runs of full blocks (the avx512 step encodes each block inside the next one's update)
    broken by blocks that take other paths: an m absmax without a finite reciprocal (encoded
    by division), an all-zero block, a NaN gradient, and a partial last block."""
    maps = (dynamic_map(True), dynamic_map(False))
    grad = torch.randn(7 * BLOCK - 50, generator=torch.Generator().manual_seed(3)) * 1e-3
    grad[2 * BLOCK:3 * BLOCK] *= 2.0**-120  # m = 0.1 g: absmax below 2**-128
    grad[4 * BLOCK:5 * BLOCK] = 0.0
    grad[5 * BLOCK + 17] = float("nan")

    def run(kernel):
        param = torch.nn.Parameter(torch.linspace(-1.0, 1.0, grad.numel()))
        opt = _paged8([param])
        opt.pool.set_quant_maps(*maps, kernel=kernel)
        for _ in range(3):
            param.grad = grad.clone()
            opt.step()
        absmax = opt.state_dict(quantized=True)["state"][0]["exp_avg_absmax"]
        codes = opt.state_dict(quantized=True)["state"][0]["exp_avg_codes"]
        out = param.detach().view(torch.int32).clone(), opt.state_dict(quantized=True)
        opt.close()
        return out, absmax, codes

    probe = _quantizer(require_pool)
    kernels = _kernels(probe)
    probe.close()
    (ref_param, ref_state), absmax, codes = run("scalar")
    assert torch.isinf(1 / absmax[2]) and absmax[4] == 0.0 and codes[:BLOCK].ne(codes[0]).any()
    for kernel in kernels[1:]:
        (param, state), _, _ = run(kernel)
        assert torch.equal(param, ref_param), kernel
        for name, value in ref_state["state"][0].items():
            other = state["state"][0][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) \
                else value == other, (kernel, name)


def test_unknown_kernel_is_refused(require_pool):
    opt = _quantizer(require_pool)
    with pytest.raises(ValueError, match="unknown kernel 'avx9'"):
        opt.pool.set_quant_maps(dynamic_map(True), dynamic_map(False), kernel="avx9")
    opt.close()
