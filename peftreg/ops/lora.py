# SPDX-License-Identifier: Apache-2.0
"""The LoRA ops: ``peftreg::lora_linear`` and its backward op, each with wrapper, fake, autograd.

``peftreg::lora_linear`` computes, with rows flattened (``x`` is (rows, in)) and ``x_l`` the
LoRA input (``x_lora`` when given, else ``x``, after the op's own dropout when ``dropout_p > 0``)::

    u = x_l A^T                      (rows, r)
    y = x W^T + b + s * u B^T        (rows, out)

so for an upstream gradient ``g = dL/dy`` (rows, out)::

    grad_u  = s * g B                (rows, r)
    grad_B  = s * g^T u              (out, r)
    grad_A  = grad_u^T x_l           (r, in)
    grad_x  = g W  (+ grad_u A when x_lora is None: x feeds both paths)
    grad_xl = grad_u A               (only when x_lora is given)
    grad_b  = g.sum(0)
    grad_W  = g^T x

Each gradient is computed only when ``ctx.needs_input_grad`` asks for it (the base weight is
normally frozen), and the forward saves only the inputs those gradients read. All but ``grad_W``
and ``grad_b`` come from ``peftreg::lora_linear_backward`` (csrc/fused/); ``u`` is recomputed
there rather than saved. The dense (out, in) product ``B A`` is never formed.

Kernel choice: :data:`LORA_LINEAR` ``.run`` follows the crossover in :func:`_fused_is_faster`
(measured, docs/ops.md "When the fused ops run").
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

import torch

from peftreg.ops import _checks as ck
from peftreg.ops import reference
from peftreg.ops._op import Op, saved

__all__ = ["LORA_GROUPED_ADD", "LORA_GROUPED_ADD_BACKWARD", "LORA_LINEAR",
           "LORA_LINEAR_BACKWARD", "lora_grouped_add", "lora_linear", "new_dropout_seed"]

_NUM_INPUTS = 9  # x, weight, bias, lora_a, lora_b, scaling, x_lora, dropout_p, seed
# From this many rows a 16-bit CPU call widens to float32 inside the kernel (csrc/fused/
# lora_cpu.cpp); below it the kernel keeps ATen's 16-bit GEMV, the same work as plain PyTorch.
_CPU_WIDEN_ROWS = 32
# Below this many rows the backward's bf16 row kernel runs also on processors with bf16
# arithmetic (measured crossover, csrc/fused/lora_cpu.cpp).
_NATIVE_BF16_ROW_KERNEL_ROWS = 2


def new_dropout_seed() -> torch.Tensor:
    """A fresh seed for the fused ops' dropout (and :func:`peftreg.ops.reference.lora_dropout`).

    Drawn from torch's default CPU generator, so ``torch.manual_seed`` makes training
    reproducible; traceable by ``torch.compile``.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def cpu_flags() -> frozenset[str]:
    """The feature flags Linux reports for this CPU (empty where ``/proc/cpuinfo`` is absent)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _native_16bit() -> frozenset[torch.dtype]:
    """The 16-bit dtypes this x86 CPU multiplies natively (read once, at import: the crossover
    runs inside traced forwards, where file reads would break the graph)."""
    if platform.machine() not in ("x86_64", "AMD64", "i386", "i686"):
        return frozenset((torch.bfloat16, torch.float16))  # the kernel trusts ATen's GEMM there
    flags = cpu_flags()
    return frozenset(dtype for dtype, flag in ((torch.bfloat16, "avx512_bf16"),
                                               (torch.float16, "avx512_fp16")) if flag in flags)


_NATIVE_16BIT = _native_16bit()
# F16C widens fp16 in the row kernel (with AVX2 and FMA, as csrc/fused/lora_cpu.cpp asks).
_HAS_F16C = platform.machine() in ("x86_64", "AMD64", "i386", "i686") and {
    "f16c", "avx2", "fma"} <= cpu_flags()


def cpu_widens_16bit(dtype: torch.dtype) -> bool:
    """Whether the CPU kernels widen ``dtype`` (bf16/fp16) to float32 from 32 rows: the
    processor lacks native arithmetic for it. Mirrors ``cpu_widens_16bit`` in
    csrc/fused/lora_cpu.cpp, including its ``PEFTREG_CPU_WIDEN_16BIT`` override."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    forced = os.environ.get("PEFTREG_CPU_WIDEN_16BIT", "")
    if forced:
        return forced != "0"
    return dtype not in _NATIVE_16BIT


def cpu_16bit_rows_kernel(dtype: torch.dtype, rows: int) -> bool:
    """Whether the CPU backward computes ``g @ W`` for bf16/fp16 with its row kernel (W read
    once, widened in registers) rather than ATen: below ``_CPU_WIDEN_ROWS`` rows on processors
    without the dtype's arithmetic, below ``_NATIVE_BF16_ROW_KERNEL_ROWS`` for bf16 with it;
    fp16 needs F16C. Mirrors ``cpu_16bit_rows_kernel`` in csrc/fused/lora_cpu.cpp, with its
    ``PEFTREG_CPU_16BIT_ROWS`` override (and no row kernel when ``PEFTREG_CPU_WIDEN_16BIT``
    forces a path)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if dtype == torch.float16 and not _HAS_F16C:
        return False
    forced = os.environ.get("PEFTREG_CPU_16BIT_ROWS", "")
    if forced:
        return forced != "0"
    if os.environ.get("PEFTREG_CPU_WIDEN_16BIT", ""):
        return False
    native = dtype in _NATIVE_16BIT
    if dtype == torch.float16:
        return not native and rows < _CPU_WIDEN_ROWS
    return rows < (_NATIVE_BF16_ROW_KERNEL_ROWS if native else _CPU_WIDEN_ROWS)


def _fused_is_faster(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float = 1.0,
                     x_lora: torch.Tensor | None = None, dropout_p: float = 0.0,
                     *_: Any) -> bool:
    """The measured crossover of lora_linear against plain PyTorch (docs/ops.md).

    CUDA: always the kernel. CPU, below ``_CPU_WIDEN_ROWS`` rows: the kernel only for a bf16
    input gradient where :func:`cpu_16bit_rows_kernel` holds. From ``_CPU_WIDEN_ROWS`` rows:
    the kernel when it widens 16-bit inputs to float32 (no native 16-bit arithmetic: fp16 4x
    faster at 128 x 1024 here) or applies dropout (its mask is a few integer operations per
    element in C++, where plain PyTorch runs them as int64 tensor passes and keeps dropout(x)
    and the mask: 1.12x).
    Otherwise both paths run the same BLAS calls and the op's own overhead decides: plain
    PyTorch (fused/plain measured 0.92-1.00x side by side, issue 14: 0.84x).
    """
    if x.device.type != "cpu":
        return True
    rows = x.numel() // max(x.shape[-1], 1)
    if rows < _CPU_WIDEN_ROWS:
        # A bf16/fp16 input gradient: without that arithmetic ATen's g @ W is a slow generic
        # loop (120 ms against 7 ms in fp32 at 1 x 4096 x 4096); the op's row kernel is not
        # (docs/ops.md "When the fused ops run").
        return (x.requires_grad and torch.is_grad_enabled()
                and cpu_16bit_rows_kernel(x.dtype, rows))
    return cpu_widens_16bit(x.dtype) or dropout_p > 0


LORA_LINEAR = Op("lora_linear", reference=reference.lora_linear, faster=_fused_is_faster)
LORA_LINEAR_BACKWARD = Op("lora_linear_backward")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """A LoRA-adapted linear layer in one fused op: base product plus low-rank update.

    Computes ``x @ weight^T + bias + scaling * ((x_lora or x) @ lora_a^T) @ lora_b^T``
    (LoRA, Hu et al. 2021, eq. 3, with ``scaling = alpha / r``) without forming the dense
    ``lora_b @ lora_a`` product. Differentiable in every tensor argument; gradients are computed
    only for those that require them.

    Args:
        x: input of shape ``(..., in_features)``; any number of leading dimensions.
        weight: base weight, ``(out_features, in_features)`` (usually frozen).
        bias: base bias ``(out_features,)``, or None.
        lora_a: down-projection A, ``(r, in_features)``.
        lora_b: up-projection B, ``(out_features, r)``.
        scaling: factor applied to the low-rank update (``alpha / r``).
        x_lora: input of the low-rank path when it differs from ``x``, typically
            ``dropout(x)`` computed by the caller (so dropout's backward stays torch's); same
            shape as ``x``. ``None``, or ``x`` itself, means the LoRA path reads ``x``.
        dropout_p: dropout probability on the LoRA path's input, applied inside the op; the
            backward regenerates the mask from ``dropout_seed`` instead of saving it or
            ``dropout(x)`` (see docs/ops.md). Excludes ``x_lora``.
        dropout_seed: int64 tensor with one element (for example
            :func:`new_dropout_seed`); required when ``dropout_p > 0``.

    Returns:
        Tensor of shape ``(..., out_features)`` with ``x``'s dtype, on ``x``'s device.

    Raises:
        ExtensionUnavailableError: the compiled extension is not loaded, or it has no kernel for
            ``x``'s device (for example a CPU-only build given CUDA tensors).
        RuntimeError: mismatched shapes, dtypes or devices; the message names the argument.
            All tensors must share one dtype (float32, bfloat16, float16; float64 is accepted
            for gradient checking) and one device.
    """
    if x_lora is x:
        x_lora = None  # identical inputs: take the cheaper path, gradients are the same
    return LORA_LINEAR(x, weight, bias, lora_a, lora_b, float(scaling), x_lora,
                       float(dropout_p), dropout_seed)


# --- fake kernels (the checks of csrc/fused/lora_kernels.h) ----------------------------------


def check_lora_factors(op: str, lora_a: torch.Tensor, lora_b: torch.Tensor, in_features: int,
                       out_features: int, in_meaning: str, out_meaning: str) -> None:
    """A (r, in) and B (out, r) against the layer's sizes; shared with nf4_lora_linear."""
    ck.dim(op, lora_a, "lora_a", 2, "(r, in_features)")
    ck.dim(op, lora_b, "lora_b", 2, "(out_features, r)")
    ck.size(op, lora_a, "lora_a", 1, in_features, "(r, in_features)", in_meaning)
    ck.size(op, lora_b, "lora_b", 0, out_features, "(out_features, r)", out_meaning)
    ck.size(op, lora_b, "lora_b", 1, lora_a.shape[0], "(out_features, r)", "r = lora_a.shape[0]")


@LORA_LINEAR.register_fake
def _lora_linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    op = LORA_LINEAR.qualname
    ck.min_dim(op, x, "x", 1, "(..., in_features)")
    ck.dim(op, weight, "weight", 2, "(out_features, in_features)")
    ck.dim(op, lora_a, "lora_a", 2, "(r, in_features)")
    ck.dim(op, lora_b, "lora_b", 2, "(out_features, r)")
    in_features, out_features = x.shape[-1], weight.shape[0]
    ck.size(op, weight, "weight", 1, in_features, "(out_features, in_features)",
            "in_features = x.shape[-1]")
    check_lora_factors(op, lora_a, lora_b, in_features, out_features,
                       "in_features = x.shape[-1]", "out_features = weight.shape[0]")
    ck.optional_vector(op, bias, "bias", out_features, "(out_features,)",
                       "out_features = weight.shape[0]")
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    if bias is not None:
        named.append(("bias", bias))
    if x_lora is not None:
        ck.same_shape(op, x_lora, "x_lora", x, "x")
        named.append(("x_lora", x_lora))
    ck.supported_dtype(op, x, "x")
    ck.same_dtype(op, named, x, "x")
    ck.same_device(op, named, x, "x")
    return x.new_empty((*x.shape[:-1], out_features))


def lora_grads_fake(grad: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    has_x_lora: bool, output_mask: Sequence[bool]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes of (grad_x, grad_lora_a, grad_lora_b, grad_x_lora); empty where not requested."""
    need_x, need_a, need_b, need_xl = output_mask
    x_shape = (*grad.shape[:-1], lora_a.shape[1])
    # Each unrequested output is its own empty tensor: outputs never alias one another.
    return (grad.new_empty(x_shape if need_x else (0,)),
            grad.new_empty(lora_a.shape if need_a else (0,)),
            grad.new_empty(lora_b.shape if need_b else (0,)),
            grad.new_empty(x_shape if need_xl and has_x_lora else (0,)))


def check_lora_backward(op: str, grad: torch.Tensor, x: torch.Tensor | None,
                        weight: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        x_lora: torch.Tensor | None, output_mask: Sequence[bool],
                        weight_needed: bool) -> None:
    """check_lora_backward_args (csrc/fused/lora_kernels.h); shared with nf4_lora_linear."""
    ck.min_dim(op, grad, "grad", 1, "(..., out_features)")
    ck.dim(op, lora_a, "lora_a", 2, "(r, in_features)")
    ck.dim(op, lora_b, "lora_b", 2, "(out_features, r)")
    out_features, in_features = grad.shape[-1], lora_a.shape[1]
    ck.size(op, lora_b, "lora_b", 0, out_features, "(out_features, r)",
            "out_features = grad.shape[-1]")
    ck.size(op, lora_b, "lora_b", 1, lora_a.shape[0], "(out_features, r)", "r = lora_a.shape[0]")
    need_x, need_a, need_b, _ = output_mask
    lora_input = x_lora if x_lora is not None else x
    ck.check(op, not (need_a or need_b) or lora_input is not None,
             "the gradients of lora_a/lora_b need the LoRA input: pass x (or x_lora)")
    ck.check(op, not (weight_needed and need_x) or weight is not None,
             "grad_x needs the base weight: pass weight")
    x_shape = [*grad.shape[:-1], in_features]
    for name, t in (("x", x), ("x_lora", x_lora)):
        if t is not None:
            ck.check(op, list(t.shape) == x_shape,
                     f"argument '{name}' must have shape {x_shape} (grad's leading dims, "
                     f"in_features) but has shape {ck.shape(t)}")
            ck.same_dtype(op, [(name, t)], grad, "grad")
            ck.same_device(op, [(name, t)], grad, "grad")
    if weight_needed and weight is not None:
        ck.dim(op, weight, "weight", 2, "(out_features, in_features)")
        ck.size(op, weight, "weight", 0, out_features, "(out_features, in_features)",
                "out_features = grad.shape[-1]")
        ck.size(op, weight, "weight", 1, in_features, "(out_features, in_features)",
                "in_features = lora_a.shape[1]")
        ck.same_dtype(op, [("weight", weight)], grad, "grad")
        ck.same_device(op, [("weight", weight)], grad, "grad")
    ck.supported_dtype(op, grad, "grad")
    ck.same_dtype(op, [("lora_a", lora_a), ("lora_b", lora_b)], grad, "grad")
    ck.same_device(op, [("lora_a", lora_a), ("lora_b", lora_b)], grad, "grad")


@LORA_LINEAR_BACKWARD.register_fake
def _lora_linear_backward_fake(
    grad: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None,
    output_mask: Sequence[bool],
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_lora_backward(LORA_LINEAR_BACKWARD.qualname, grad, x, weight, lora_a, lora_b, x_lora,
                        output_mask, weight_needed=True)
    return lora_grads_fake(grad, lora_a, lora_b, x_lora is not None, output_mask)


# --- autograd --------------------------------------------------------------------------------


def padded_needs(ctx: Any, count: int) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` for the op's ``count`` inputs.

    The dispatcher drops trailing arguments equal to their defaults (``x_lora=None``), and
    torch.library may append an entry of its own, so the raw tuple can be shorter or longer
    than the schema. Entries past the real inputs are False either way.
    """
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:count])
    return needs + (False,) * (count - len(needs))


def with_defaults(inputs: tuple[Any, ...], count: int, trailing: tuple[Any, ...]
                  ) -> tuple[Any, ...]:
    """``inputs`` completed to ``count`` entries with the schema's defaults for the trailing
    ``len(trailing)`` arguments (the dispatcher may drop trailing arguments left at default)."""
    inputs = tuple(inputs)[:count]
    missing = count - len(inputs)
    return inputs + trailing[len(trailing) - missing:] if missing else inputs


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, _bias, lora_a, lora_b, scaling, x_lora, dropout_p, dropout_seed = with_defaults(
        inputs, _NUM_INPUTS, (None, 0.0, None))
    need_x, need_w, _need_bias, need_a, need_b, _, need_xl, *_ = padded_needs(ctx, _NUM_INPUTS)
    has_x_lora = x_lora is not None
    # x is read by grad_W, and by grad_A/grad_B when it is also the LoRA input (dropout's mask
    # is regenerated from the seed, so dropout(x) itself is never saved); weight by grad_x.
    save_x = need_w or (not has_x_lora and (need_a or need_b))
    save_x_lora = has_x_lora and (need_a or need_b)
    ctx.save_for_backward(
        x if save_x else None,
        weight if need_x else None,
        lora_a,
        lora_b,
        x_lora if save_x_lora else None,
        dropout_seed,
    )
    ctx.dropout_p = float(dropout_p or 0.0)
    ctx.scaling = float(scaling)
    ctx.output_mask = [need_x, need_a, need_b, need_xl and has_x_lora]


def _grads_differentiable(grad: torch.Tensor, x: torch.Tensor | None,
                          weight: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, s: float, x_lora: torch.Tensor | None,
                          mask: list[bool], dropout_p: float = 0.0,
                          seed: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """The module docstring's formulas as plain matmuls (for a differentiable backward)."""
    op = LORA_LINEAR.qualname
    need_x, need_a, need_b, need_xl = mask
    g = grad.reshape(-1, grad.shape[-1])
    x_l = x_lora if x_lora is not None else x
    if dropout_p > 0 and x_l is not None:
        x_l = reference.lora_dropout(x_l, dropout_p, seed)
    xl2d = x_l.reshape(-1, lora_a.shape[1]) if x_l is not None else None
    grad_u = torch.mm(g, lora_b) * s
    x_shape = (*grad.shape[:-1], lora_a.shape[1])
    grad_x: torch.Tensor | None = None
    grad_a: torch.Tensor | None = None
    grad_b: torch.Tensor | None = None
    grad_xl: torch.Tensor | None = None
    if need_x:
        grad_x = torch.mm(g, saved(weight, op, "weight"))
        if x_lora is None:
            low = torch.mm(grad_u, lora_a)
            if dropout_p > 0:  # dropout's backward: the same mask and scale
                low = reference.lora_dropout(low, dropout_p, seed)
            grad_x = grad_x + low
        grad_x = grad_x.reshape(x_shape)
    if need_a:
        grad_a = torch.mm(grad_u.t(), saved(xl2d, op, "the LoRA input (x or x_lora)"))
    if need_b:
        xl_a = torch.mm(saved(xl2d, op, "the LoRA input (x or x_lora)"), lora_a.t())
        grad_b = torch.mm(g.t(), xl_a) * s
    if need_xl:
        grad_xl = torch.mm(grad_u, lora_a).reshape(x_shape)
    return [grad_x, grad_a, grad_b, grad_xl]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # x, weight and x_lora are None unless a requested gradient reads them (_setup_context).
    x: torch.Tensor | None
    weight: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    x_lora: torch.Tensor | None
    seed: torch.Tensor | None
    x, weight, lora_a, lora_b, x_lora, seed = ctx.saved_tensors
    _, need_w, need_bias, *_ = padded_needs(ctx, _NUM_INPUTS)
    mask: list[bool] = ctx.output_mask
    grads: list[torch.Tensor | None] = [None, None, None, None]
    if any(mask) and torch.is_grad_enabled():
        # backward(create_graph=True): the compiled backward has no derivative of its own, so
        # the same formulas run as differentiable matmuls (double backward, gradgradcheck).
        grads = _grads_differentiable(grad, x, weight, lora_a, lora_b, ctx.scaling, x_lora,
                                      mask, ctx.dropout_p, seed)
    elif any(mask):
        grads = list(LORA_LINEAR_BACKWARD.overload(
            grad, x, weight, lora_a, lora_b, ctx.scaling, x_lora, mask, ctx.dropout_p, seed))
        grads = [g if wanted else None for g, wanted in zip(grads, mask, strict=True)]
    grad_x, grad_a, grad_b, grad_xl = grads
    grad_w = grad_bias = None
    g = grad.reshape(-1, grad.shape[-1])
    if need_w:
        x = saved(x, LORA_LINEAR.qualname, "x")
        grad_w = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))
    if need_bias:
        grad_bias = g.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, grad_xl, None, None


LORA_LINEAR.register_autograd(_backward, _setup_context)
LORA_LINEAR_BACKWARD.not_differentiable(
    "is not differentiable: it is lora_linear's first-order backward")


# --- many adapters in one batch: peftreg::lora_grouped_add -----------------------------------
#
# Rows of one batch train different LoRA adapters (peftreg/row_adapters.py). With rows flattened,
# ``rows`` grouped by adapter (adapter k owns the next ``counts[k]`` entries; ``counts`` is an
# int64 tensor, so that under torch.compile a new split of the rows is data rather than a
# recompile), X_k = x[rows_k],
# G_k = grad[rows_k] and s_k = scaling[k]::
#
#     U_k = s_k X_k A_k^T                 out = base;  out[rows_k] += U_k B_k^T
#     grad_U_k = s_k G_k B_k              grad_base = grad
#     grad_A_k = grad_U_k^T X_k           grad_B_k = G_k^T U_k
#     grad_x[rows_k] = grad_U_k A_k       (the low-rank path's share; the base adds its own)
#
# U is the op's second output, saved for grad_B instead of recomputed. The kernel
# (csrc/fused/lora_grouped.cpp) runs one GEMM per adapter slice, or one batched GEMM when every
# adapter holds the same number of rows. With LoRA dropout the caller passes dropout(x) as x
# (row_adapters.py draws each row's mask with its own adapter's p): x here is only the low-rank
# path's input.

_GROUPED_NUM_INPUTS = 7  # base, x, lora_a, lora_b, scaling, rows, counts


def _counts_list(counts: torch.Tensor | Sequence[int]) -> list[int]:
    """The row counts as ints, for the plain paths' Python loop over adapter slices."""
    return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)


def _grouped_counts(counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``counts`` as the op takes it: an int64 tensor (a tensor is passed through)."""
    if isinstance(counts, torch.Tensor):
        return counts
    return torch.tensor(list(counts), dtype=torch.int64)


def _grouped_reference(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: torch.Tensor, rows: torch.Tensor,
                       counts: torch.Tensor | Sequence[int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The op in plain PyTorch (differentiable): one pair of products per adapter slice."""
    x2d = x.reshape(-1, x.shape[-1])
    gathered = x2d.index_select(0, rows)
    us, updates = [], []
    for k, part in enumerate(gathered.split(_counts_list(counts))):
        u = torch.mm(part, lora_a[k].t()) * scaling[k].to(part.dtype)
        us.append(u)
        updates.append(torch.mm(u, lora_b[k].t()))
    u = torch.cat(us) if us else x.new_zeros((0, lora_a.shape[1]))
    update = torch.cat(updates) if updates else base.new_zeros((0, base.shape[-1]))
    out = base.reshape(-1, base.shape[-1]).index_add(0, rows, update.to(base.dtype))
    return out.reshape(base.shape), u


def _grouped_grads_plain(grad: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: torch.Tensor, rows: torch.Tensor,
                         counts: torch.Tensor | Sequence[int], _u: torch.Tensor,
                         output_mask: Sequence[bool]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op's outputs from the formulas above as plain (differentiable) products.

    U is recomputed from x and A rather than read from the saved output: the saved one is
    detached, and a double backward needs grad_B's dependence on A."""
    need_x, need_a, need_b = output_mask
    counts = _counts_list(counts)
    in_features = x.shape[-1]
    g = grad.reshape(-1, grad.shape[-1]).index_select(0, rows)
    xs = x.reshape(-1, in_features).index_select(0, rows)
    grad_a = torch.zeros_like(lora_a) if need_a else x.new_empty((0,))
    grad_b = torch.zeros_like(lora_b) if need_b else x.new_empty((0,))
    pieces_a, pieces_b, pieces_x = [], [], []
    offset = 0
    for k, n in enumerate(counts):
        gk, xk = g[offset:offset + n], xs[offset:offset + n]
        offset += n
        uk = torch.mm(xk, lora_a[k].t()) * scaling[k].to(xk.dtype)
        grad_u = torch.mm(gk, lora_b[k]) * scaling[k].to(gk.dtype)
        pieces_a.append(torch.mm(grad_u.t(), xk))
        pieces_b.append(torch.mm(gk.t(), uk))
        pieces_x.append(torch.mm(grad_u, lora_a[k]))
    if need_a and counts:
        grad_a = torch.stack(pieces_a)
    if need_b and counts:
        grad_b = torch.stack(pieces_b)
    grad_x = x.new_empty((0,))
    if need_x:
        low = torch.cat(pieces_x) if pieces_x else xs
        grad_x = x.new_zeros((x.numel() // max(in_features, 1), in_features)).index_add(
            0, rows, low).reshape(x.shape)
    return grad_x, grad_a, grad_b


# From this many adapters with rows in one layer the CPU op beats its plain path in fp32
# (set between the two measured points, docs/ops.md).
_GROUPED_CPU_ADAPTERS = 16


def _grouped_is_faster(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                       *_: Any) -> bool:
    """Crossover of lora_grouped_add against its plain path (docs/ops.md). The plain path runs
    two products per adapter from Python, each recorded by autograd: on the CPU in fp32 it cost
    1.54x the op at 64 adapters and 0.94x at 8 (bench_multi_adapter.py, one thread, loaded
    machine), so the op runs from ``_GROUPED_CPU_ADAPTERS`` adapters, and always for 16-bit
    inputs the kernel widens to float32 (no 16-bit arithmetic on this CPU). CUDA: always (one
    call instead of two launches per adapter; not measured here). Under torch.compile: always,
    since the plain path's loop reads the counts as ints, which would specialize the graph on
    the split of the rows (a recompile for every new split)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    return lora_a.shape[0] >= _GROUPED_CPU_ADAPTERS or cpu_widens_16bit(x.dtype)


LORA_GROUPED_ADD = Op("lora_grouped_add", reference=_grouped_reference,
                      faster=_grouped_is_faster)
LORA_GROUPED_ADD_BACKWARD = Op("lora_grouped_add_backward")


def lora_grouped_add(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: torch.Tensor, rows: torch.Tensor,
                     counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Add each row's own LoRA update to ``base``, differentiable in every adapter at once.

    Row ``rows[j]`` of adapter ``k`` (of the flattened leading dimensions) gets
    ``base + scaling[k] * (x @ lora_a[k]^T) @ lora_b[k]^T``; other rows keep ``base``. The
    gradients of ``lora_a[k]`` and ``lora_b[k]`` are those of adapter ``k``'s rows alone.

    Args:
        base: base layer output ``(..., out_features)``.
        x: layer input ``(..., in_features)``.
        lora_a: stacked ``A``, ``(adapters, r, in_features)`` (lower ranks zero-padded).
        lora_b: stacked ``B``, ``(adapters, out_features, r)``.
        scaling: ``(adapters,)`` per-adapter ``alpha / r`` (not differentiable).
        rows: int64 row indices grouped by adapter: adapter ``k`` owns the next ``counts[k]``.
        counts: rows per adapter, summing to ``rows.numel()``: an int64 tensor ``(adapters,)``
            on the CPU or ``x``'s device (what ``torch.compile`` needs to take a new split
            without recompiling), or a sequence of ints (turned into one).

    Returns:
        Tensor shaped like ``base``, with ``x``'s dtype.

    Raises:
        ExtensionUnavailableError: no compiled kernel for ``x``'s device.
        RuntimeError: bad shapes, dtypes, devices, rows or counts (named in the message).
    """
    out, _u = LORA_GROUPED_ADD(base, x, lora_a, lora_b, scaling, rows, _grouped_counts(counts))
    return out


def _grouped_checks(op: str, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> None:
    """check_grouped of csrc/fused/lora_grouped.cpp, in its order and words, up to the values
    of ``counts`` (no negative entry, summing to the taken rows): data, which only the real
    kernel reads, so that the traced graph does not depend on the split of the rows."""
    ck.stacked_lora(op, x, lora_a, lora_b, scaling)
    ck.dim(op, rows, "rows", 1, "(taken rows,)")
    adapters = lora_a.shape[0]
    ck.check(op, counts.dim() == 1 and counts.shape[0] == adapters,
             f"argument 'counts' must hold one row count per adapter, shape [{adapters}] "
             f"(adapters = lora_a.shape[0]), but has shape {ck.shape(counts)}")
    ck.check(op, counts.dtype == torch.int64,
             f"argument 'counts' has dtype {ck.scalar_name(counts.dtype)}; expected Long (int64)")
    ck.check(op, rows.dtype == torch.int64,
             f"argument 'rows' has dtype {ck.scalar_name(rows.dtype)}; expected Long (int64)")
    ck.supported_dtype(op, x, "x")
    ck.same_dtype(op, [("lora_a", lora_a), ("lora_b", lora_b)], x, "x")
    ck.check(op, scaling.dtype in ck.SUPPORTED_FLOATS,
             f"argument 'scaling' has dtype {ck.scalar_name(scaling.dtype)}; expected a "
             "floating dtype")
    ck.same_device(op, [("lora_a", lora_a), ("lora_b", lora_b), ("scaling", scaling),
                        ("rows", rows)], x, "x")
    ck.check(op, counts.device.type == "cpu" or counts.device == x.device,
             f"argument 'counts' is on device {counts.device} but 'x' is on device {x.device}; "
             "counts must be on the CPU or on x's device")


def _leading_shape_check(op: str, t: torch.Tensor, name: str, x: torch.Tensor,
                         out_features: int) -> None:
    expected = [*x.shape[:-1], out_features]
    ck.check(op, list(t.shape) == expected,
             f"argument '{name}' must have shape (*x.shape[:-1], out_features) = {expected} but "
             f"has shape {ck.shape(t)}")


@LORA_GROUPED_ADD.register_fake
def _lora_grouped_add_fake(base: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                           lora_b: torch.Tensor, scaling: torch.Tensor, rows: torch.Tensor,
                           counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    op = LORA_GROUPED_ADD.qualname
    _grouped_checks(op, x, lora_a, lora_b, scaling, rows, counts)
    _leading_shape_check(op, base, "base", x, lora_b.shape[1])
    ck.same_dtype(op, [("base", base)], x, "x")
    ck.same_device(op, [("base", base)], x, "x")
    return base.new_empty(base.shape), x.new_empty((rows.shape[0], lora_a.shape[1]))


@LORA_GROUPED_ADD_BACKWARD.register_fake
def _lora_grouped_add_backward_fake(grad: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                                    lora_b: torch.Tensor, scaling: torch.Tensor,
                                    rows: torch.Tensor, counts: torch.Tensor, u: torch.Tensor,
                                    output_mask: Sequence[bool]
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = LORA_GROUPED_ADD_BACKWARD.qualname
    _grouped_checks(op, x, lora_a, lora_b, scaling, rows, counts)
    _leading_shape_check(op, grad, "grad", x, lora_b.shape[1])
    taken, rank = rows.shape[0], lora_a.shape[1]
    ck.check(op, u.dim() == 2 and u.shape[0] == taken and u.shape[1] == rank,
             f"argument 'u' must have shape (rows.shape[0], r) = [{taken}, {rank}] (the "
             f"forward's second output) but has shape {ck.shape(u)}")
    ck.same_dtype(op, [("grad", grad), ("u", u)], x, "x")
    ck.same_device(op, [("grad", grad), ("u", u)], x, "x")
    need_x, need_a, need_b = output_mask
    return (x.new_empty(x.shape if need_x else (0,)),
            x.new_empty(lora_a.shape if need_a else (0,)),
            x.new_empty(lora_b.shape if need_b else (0,)))


def _grouped_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    _base, x, lora_a, lora_b, scaling, rows, counts = inputs
    _out, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, lora_a, lora_b, scaling, rows, counts, u)


def _grouped_backward(ctx: Any, grad: torch.Tensor, _grad_u: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, ...]:
    x, lora_a, lora_b, scaling, rows, counts, u = ctx.saved_tensors
    need_base, need_x, need_a, need_b, *_ = padded_needs(ctx, _GROUPED_NUM_INPUTS)
    mask = [need_x, need_a, need_b]
    grads: tuple[torch.Tensor | None, ...] = (None, None, None)
    if any(mask) and torch.is_grad_enabled():
        # backward(create_graph=True): the kernel has no derivative of its own.
        grads = _grouped_grads_plain(grad, x, lora_a, lora_b, scaling, rows, counts, u, mask)
    elif any(mask):
        grads = LORA_GROUPED_ADD_BACKWARD.overload(grad, x, lora_a, lora_b, scaling, rows,
                                                   counts, u, mask)
    grad_x, grad_a, grad_b = (g if wanted else None for g, wanted in zip(grads, mask,
                                                                           strict=True))
    return (grad if need_base else None, grad_x, grad_a, grad_b, None, None, None)


LORA_GROUPED_ADD.register_autograd(_grouped_backward, _grouped_setup_context)
LORA_GROUPED_ADD_BACKWARD.not_differentiable(
    "is not differentiable: it is lora_grouped_add's first-order backward")
