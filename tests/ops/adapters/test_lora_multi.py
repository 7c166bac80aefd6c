# SPDX-License-Identifier: Apache-2.0
"""peftreg::lora_multi_add against the float64 reference, opcheck, and per-row adapters through
AdaptedModel (each row equals running its adapter alone; compiled and plain paths agree)."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import scaled_close

import peftreg
from peftreg.errors import AdapterError, UnsupportedOperationError
from peftreg.ops import adapters, kernels, reference

pytestmark = pytest.mark.usefixtures("require_extension")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
dtype_param = pytest.mark.parametrize("dtype", list(DTYPES.values()),
                                      ids=[f"dtype={k}" for k in DTYPES])
# (leading dims, in, out, r, adapters): odd sizes, r = 1, a single adapter, many rows.
SHAPES = [((1,), 1, 3, 1, 1), ((7,), 17, 31, 4, 3), ((3, 5), 65, 33, 16, 8),
          ((2, 2, 3), 9, 4, 2, 2), ((257,), 40, 24, 8, 5)]
shape_param = pytest.mark.parametrize(
    "shape", SHAPES, ids=[f"shape={'x'.join(map(str, s[0]))},in={s[1]},out={s[2]},r={s[3]},"
                          f"n={s[4]}" for s in SHAPES])


def masters(lead, in_f, out_f, r, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "base": torch.randn(*lead, out_f, generator=gen, dtype=torch.float64),
        "x": torch.randn(*lead, in_f, generator=gen, dtype=torch.float64),
        "lora_a": torch.randn(n, r, in_f, generator=gen, dtype=torch.float64) / math.sqrt(in_f),
        "lora_b": torch.randn(n, out_f, r, generator=gen, dtype=torch.float64) / math.sqrt(r),
        "scaling": torch.rand(n, generator=gen, dtype=torch.float64) + 0.5,
        # Every adapter and "none" (-1) appear, in a scrambled order.
        "index": torch.randint(-1, n, lead, generator=gen),
    }


def per_row_loop(m):
    """Independent check of the reference itself: one row at a time, LoRA eq. 3."""
    x = m["x"].reshape(-1, m["x"].shape[-1])
    out = m["base"].reshape(-1, m["base"].shape[-1]).clone()
    for i, k in enumerate(m["index"].reshape(-1).tolist()):
        if k >= 0:
            out[i] += m["scaling"][k] * (m["lora_b"][k] @ (m["lora_a"][k] @ x[i]))
    return out.reshape(m["base"].shape)


@shape_param
@dtype_param
def test_matches_reference(op_device, dtype, shape):
    m = masters(*shape)
    low = {k: (v.to(dtype) if v.is_floating_point() and k != "scaling" else v).to(op_device)
           for k, v in m.items()}
    high = {k: (v.to(dtype).double() if v.is_floating_point() and k != "scaling" else v)
            for k, v in m.items()}
    out = adapters.lora_multi_add(**low)
    expected = reference.lora_multi_add(**high)
    torch.testing.assert_close(expected, per_row_loop(high))
    assert out.dtype == dtype and out.shape == m["base"].shape
    scaled_close(out, expected, "lora_multi_add.forward", dtype, "output")
    # Rows with index -1 are the base output, bit for bit.
    none = (m["index"] == -1).to(op_device)
    assert torch.equal(out[none], low["base"][none])


@dtype_param
def test_grouped_gemm_and_row_paths_in_one_batch(op_device, dtype):
    """The CPU kernel sends adapters with >= 16 rows through BLAS and the rest row by row."""
    m = masters((60,), 24, 20, 4, 3, seed=3)
    m["index"] = torch.tensor([0] * 40 + [1] * 3 + [-1] * 5 + [2] * 12)[torch.randperm(60)]
    low = {k: (v.to(dtype) if v.is_floating_point() and k != "scaling" else v).to(op_device)
           for k, v in m.items()}
    high = {k: (v.to(dtype).double() if v.is_floating_point() and k != "scaling" else v)
            for k, v in m.items()}
    scaled_close(adapters.lora_multi_add(**low), per_row_loop(high), "lora_multi_add.forward",
                 dtype, "output")


def test_per_sequence_index_and_padded_ranks(op_device):
    """A (batch,) index broadcasts over the sequence; rank padding with zeros is exact."""
    m = masters((3, 4), 10, 6, 4, 2)
    m["lora_a"][1, 2:] = 0.0  # adapter 1 has rank 2, zero-padded to 4
    m["lora_b"][1, :, 2:] = 0.0
    per_seq = torch.tensor([1, -1, 0])
    full = per_seq[:, None].expand(3, 4)
    args = {k: v.float() for k, v in m.items() if k != "index"}
    out = adapters.lora_multi_add(index=per_seq, **{k: v.to(op_device) for k, v in args.items()})
    expected = reference.lora_multi_add(index=full, **{k: v.double() for k, v in m.items()
                                                       if k != "index"})
    scaled_close(out, expected, "lora_multi_add.forward", torch.float32, "output")
    unpadded = args["base"][0] + args["scaling"][1] * (
        args["x"][0] @ args["lora_a"][1, :2].T @ args["lora_b"][1, :, :2].T)
    scaled_close(out[0], unpadded, "lora_multi_add.forward", torch.float32, "rank 2 row")


def test_bad_index_and_gradients_are_refused(op_device):
    m = {k: (v.float() if v.is_floating_point() else v).to(op_device)
         for k, v in masters((4,), 8, 5, 2, 3).items()}
    with pytest.raises(RuntimeError, match=r"argument 'index' has value 3 at row 1"):
        adapters.lora_multi_add(**{**m, "index": torch.tensor([0, 3, -1, 1])})
    with pytest.raises(RuntimeError, match=r"argument 'index' must have shape"):
        adapters.lora_multi_add(**{**m, "index": torch.zeros(5, dtype=torch.int64)})
    with pytest.raises(RuntimeError, match="inference-only"):
        adapters.lora_multi_add(**{**m, "lora_a": m["lora_a"].requires_grad_()})
    with torch.no_grad():  # the same call is fine without autograd
        adapters.lora_multi_add(**m)


def test_opcheck(op_device):
    m = masters((2, 3), 8, 6, 4, 3)
    args = tuple(v.float().to(op_device) if v.is_floating_point() else v.to(op_device)
                 for v in m.values())
    torch.library.opcheck(torch.ops.peftreg.lora_multi_add.default, args)
    bf16 = tuple(v.bfloat16() if v.is_floating_point() else v for v in args)
    torch.library.opcheck(torch.ops.peftreg.lora_multi_add.default, bf16)


# --- per-row adapters through AdaptedModel ----------------------------------------------------


def _served_model(make_tiny, dtype=torch.float32):
    from peftreg_plugins.lora import LoraConfig

    model = peftreg.adapt(make_tiny().to(dtype), LoraConfig(r=4, target_modules="all-linear"),
                          "a")
    # Different ranks, scales and targets (b leaves the MLP alone).
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"]))
    model.add_adapter("c", LoraConfig(r=2, use_rslora=True, target_modules=["v_proj", "up_proj"]))
    with torch.no_grad():
        for name in "abc":
            for p in model.adapter_parameters(name):
                p.normal_(0.0, 0.2)
    return model.eval()


def _alone(model, ids, name):
    with torch.no_grad():
        if name is None:
            with model.disable_adapters():
                return model(ids)["logits"]
        model.set_active(name)
        return model(ids)["logits"]


NAMES = ["a", "b", None, "c", "a", "b"]


@pytest.mark.parametrize("mode", ["auto", "reference"])
@dtype_param
def test_each_row_equals_its_adapter_alone(make_tiny, dtype, mode):
    model = _served_model(make_tiny, dtype)
    ids = torch.randint(0, 61, (len(NAMES), 7), generator=torch.Generator().manual_seed(2))
    with kernels(mode), torch.no_grad():
        mixed = model(ids, adapter_names=NAMES)["logits"]
        with model.per_row_adapters(NAMES):
            again = model(ids)["logits"]
    torch.testing.assert_close(mixed, again, rtol=0, atol=0)
    singles = {n: _alone(model, ids, n) for n in set(NAMES)}
    for i, name in enumerate(NAMES):
        scaled_close(mixed[i], singles[name][i], "adapters.plugin_paths", dtype, f"row {i}")
    # Twin: the adapters really differ from each other and from the base.
    for i, j in ((0, 1), (0, 2), (1, 3)):
        assert not torch.allclose(mixed[i].float(), singles[NAMES[j]][i].float(), atol=1e-2)


def test_per_row_mode_ends_with_the_block(make_tiny, token_batch):
    model = _served_model(make_tiny)
    model.set_active("b")
    before = _alone(model, token_batch, "b")
    with torch.no_grad(), model.per_row_adapters(["a"] * token_batch.shape[0]):
        model(token_batch)
    model.set_active("b")
    torch.testing.assert_close(_alone(model, token_batch, "b"), before, rtol=0, atol=0)


def test_per_row_errors_are_clear(make_tiny, token_batch):
    from peftreg_plugins.ia3 import IA3Config

    model = _served_model(make_tiny)
    model.add_adapter("scaled", IA3Config(target_modules=["k_proj"]), activate=False)
    rows = token_batch.shape[0]
    with pytest.raises(UnsupportedOperationError, match=r"adapter 'scaled' \(ia3\) cannot be "
                                                        r"served per row: only LoRA"):
        model(token_batch, adapter_names=["a"] * (rows - 1) + ["scaled"])
    with pytest.raises(AdapterError, match="no adapter named 'zzz'"):
        model(token_batch, adapter_names=["zzz"] * rows)
    with pytest.raises(UnsupportedOperationError, match=r"\d+ adapter names were given"):
        with torch.no_grad():
            model(token_batch, adapter_names=["a"] * (rows + 1))


def test_hf_llama_per_row():
    """An HF model, whose forward knows nothing of adapter_names, served per row."""
    pytest.importorskip("transformers")
    import tiny_hf

    from peftreg_plugins.lora import LoraConfig

    model = peftreg.adapt(tiny_hf.llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                          "x")
    model.add_adapter("y", LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name in "xy":
            for p in model.adapter_parameters(name):
                p.normal_(0.0, 0.3)
    model.eval()
    ids = tiny_hf.IDS
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["y", "x"]).logits
        model.set_active("x")
        x_alone = model(input_ids=ids).logits
        model.set_active("y")
        y_alone = model(input_ids=ids).logits
    scaled_close(mixed[0], y_alone[0], "adapters.plugin_paths", torch.float32, "row y")
    scaled_close(mixed[1], x_alone[1], "adapters.plugin_paths", torch.float32, "row x")
    assert not torch.allclose(x_alone[0], y_alone[0], atol=1e-3)


def test_the_row_plan_builds_one_index_per_batch(make_tiny, token_batch):
    """Every layer of one forward shares the batch's plan; layers holding the same adapters
    share one index tensor instead of each building it from the list of names."""
    from peftreg.host import AdapterHost, iter_slots

    model = _served_model(make_tiny)
    names = ["a", "b", None][: token_batch.shape[0]]
    with torch.no_grad(), model.per_row_adapters(names):
        model(token_batch)
        hosts = [slot for _, slot in iter_slots(model.model) if isinstance(slot, AdapterHost)]
        plans = {id(host.row_adapters) for host in hosts}
        plan = hosts[0].row_adapters
        built = dict(plan._index)
    assert len(plans) == 1 and len(hosts) == 14
    # Two adapter sets occur over the 14 layers (a+b on q/o; a alone elsewhere, c is unused):
    # two index tensors in all.
    assert sorted(key[0] for key in built) == [("a",), ("a", "b")]
    assert all(host.row_adapters is None for host in hosts)
