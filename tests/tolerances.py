# SPDX-License-Identifier: Apache-2.0
"""The one tolerance table of the test suite: ``(check, dtype) -> (atol, rtol)``.

Tests never write numbers inline; they call :func:`tol` (``assert_close(a, b, **tol(check,
dtype))``). Entries equal to ``torch.testing.assert_close``'s defaults carry no reason; every
loosened entry says why, with the derivation where one helps.

Scale convention for the ``lora_linear.*`` checks: kernels are compared with the float64
reference after dividing both sides by ``max(1, max|expected|)`` (see
``tests/ops/test_fused_lora.py::assert_close_scaled``), so ``atol`` is relative to the largest
entry of the tensor. Gradients such as ``g^T x`` grow with the summed dimension, and a
half-precision rounding error is proportional to the magnitude of the values involved, not to
the (possibly cancelled) entry being compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """One table entry: ``atol``/``rtol`` for ``torch.testing.assert_close`` and why."""

    atol: float
    rtol: float
    reason: str = ""


# torch.testing.assert_close defaults, for reference:
#   float64 (1e-7, 1e-7)  float32 (1e-5, 1.3e-6)  float16 (1e-5, 1e-3)  bfloat16 (1e-5, 1.6e-2)
_BF16_EPS = 2.0**-8   # bfloat16: 8 significant bits, so one rounding errs by <= 2^-9 relative
_FP16_EPS = 2.0**-11  # float16: 11 significant bits, so one rounding errs by <= 2^-12 relative

TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    # Fused kernel vs float64 reference, forward (scaled by the largest |expected|).
    ("lora_linear.forward", torch.float32): Tolerance(1e-5, 1.3e-6),
    ("lora_linear.forward", torch.float64): Tolerance(1e-7, 1e-7),
    ("lora_linear.forward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2,
        "on the ATen 16-bit path y is rounded to bf16 up to three times (base product, "
        "u = x A^T, the in-place update; the widened CPU path rounds once), "
        "each <= 2^-9 of values up to ~2x |y| when bias/base/update partly cancel: "
        "3 * 2 * 2^-9 ~= 0.012 < 2^-6; measured max 0.0072 over the test grid",
    ),
    ("lora_linear.forward", torch.float16): Tolerance(
        4 * _FP16_EPS, 1e-3,
        "same three roundings as bf16 at 2^-12 each: 3 * 2 * 2^-12 ~= 0.0015 < 2^-9; "
        "measured max 0.0008",
    ),
    # Gradients from the registered backward vs float64 autograd through the reference.
    ("lora_linear.backward", torch.float32): Tolerance(1e-5, 1.3e-6),
    ("lora_linear.backward", torch.float64): Tolerance(1e-7, 1e-7),
    ("lora_linear.backward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2,
        "the inputs and g are rounded to bf16 and each gradient passes through up to three "
        "rounded products (grad_u = s * g B, then grad_u A added to g W): as for the forward; "
        "measured max 0.0067",
    ),
    ("lora_linear.backward", torch.float16): Tolerance(
        4 * _FP16_EPS, 1e-3,
        "as bf16 at float16 precision; measured max 0.0008",
    ),
    # torch.compile(fullgraph=True) vs eager, same kernel: differences come only from the
    # compiled pointwise ops around the op (reassociated sums), so dtype defaults suffice.
    ("lora_linear.compile", torch.float32): Tolerance(1e-5, 1.3e-6),
    # peftreg::nf4_linear / nf4_linear_grad_input vs float64 dequantize-then-matmul (the
    # reference), scaled by max(1, max|expected|) like lora_linear. The kernel multiplies the
    # exact float32 weight values with the exactly widened input, accumulates in float32 and
    # rounds the output once, so only that rounding and the float32 sums differ.
    ("nf4_linear.forward", torch.float64): Tolerance(1e-7, 1e-7),
    ("nf4_linear.forward", torch.float32): Tolerance(
        1e-5, 1.3e-6,
        "float32 sums over up to 1376 terms of O(1/sqrt(in)) products; measured max 5e-7",
    ),
    ("nf4_linear.forward", torch.bfloat16): Tolerance(
        2 * _BF16_EPS, 1.6e-2,
        "one rounding of y to bf16 (<= 2^-9 of |y| <= max|y|), float32 sums otherwise: "
        "2^-9 < 2 * 2^-8",
    ),
    ("nf4_linear.forward", torch.float16): Tolerance(
        2 * _FP16_EPS, 1e-3,
        "one rounding of y to float16 (<= 2^-12 of max|y|) < 2 * 2^-11",
    ),
    ("nf4_linear.backward", torch.float64): Tolerance(1e-7, 1e-7),
    ("nf4_linear.backward", torch.float32): Tolerance(
        1e-5, 1.3e-6, "as the forward: float32 sums of O(1) terms",
    ),
    ("nf4_linear.backward", torch.bfloat16): Tolerance(
        2 * _BF16_EPS, 1.6e-2,
        "grad_x = g W rounded once to bf16; grad_b = g.sum(0) in bf16 over <= 257 rows is "
        "summed by torch with a float32 accumulator and rounded once",
    ),
    ("nf4_linear.backward", torch.float16): Tolerance(
        2 * _FP16_EPS, 1e-3, "as bf16 at float16 precision",
    ),
    # The many-row paths that decode W tiles into x.dtype (CUDA's, for cuBLAS; the CPU's, for
    # ATen's 16-bit GEMM, where the processor has 16-bit arithmetic): each weight is rounded to
    # bf16/fp16 (<= 2^-9 resp. 2^-12 relative, independent signs), which adds about that
    # fraction of the norm of the products to y, plus the output rounding.
    ("nf4_linear.tiles16_forward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2, "weight and output each rounded to bf16: 2 * 2^-9 < 4 * 2^-8"),
    ("nf4_linear.tiles16_forward", torch.float16): Tolerance(
        4 * _FP16_EPS, 1e-3, "as bf16 at float16 precision"),
    ("nf4_linear.tiles16_backward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2, "as the forward: grad_x = g W with W rounded to bf16"),
    ("nf4_linear.tiles16_backward", torch.float16): Tolerance(
        4 * _FP16_EPS, 1e-3, "as bf16 at float16 precision"),
    # Linear4bit (bf16 compute) vs the same layer's dequantize-then-F.linear in float64: the
    # input and bias are rounded to bf16 on entry (same in both), the output once on exit.
    ("linear4bit.forward", torch.bfloat16): Tolerance(
        2 * _BF16_EPS, 1.6e-2, "one rounding of the output to bf16, as nf4_linear.forward",
    ),
    # PagedAdamW (tests/optim) after up to 30 steps. vs torch.optim.AdamW on fp32 parameters:
    # the same float32 operations in the same order; torch's vectorised lerp may fuse one
    # multiply-add, an ulp per step, far inside the float32 defaults.
    ("paged_adamw.vs_torch", torch.float32): Tolerance(1e-5, 1.3e-6),
    # vs the paper's AdamW with float32 moments (tests/optim/adamw_reference.py) on half
    # parameters: both round the parameter once per step; an ulp of float32 difference in the
    # update can flip that rounding, which then stays one half-precision ulp apart.
    ("paged_adamw.vs_reference", torch.bfloat16): Tolerance(
        2 * _BF16_EPS, 1.6e-2, "an occasional one-ulp difference of the per-step bf16 rounding",
    ),
    ("paged_adamw.vs_reference", torch.float16): Tolerance(
        2 * _FP16_EPS, 1e-3, "as bf16 at float16 precision",
    ),
    # --- IA3, Houlsby, multi-LoRA (tests/ops/test_ia3_op.py, test_houlsby_op.py,
    # test_multi_lora.py): kernel vs float64 reference on the same rounded inputs, both sides
    # divided by max(1, max|expected|) as for lora_linear.
    ("ia3_linear.forward", torch.float32): Tolerance(1e-5, 1.3e-6),
    ("ia3_linear.forward", torch.float64): Tolerance(1e-7, 1e-7),
    ("ia3_linear.forward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2,
        "output scaling rounds the GEMM output, then (y + b) * l once more; input scaling rounds "
        "x * l, then the GEMM output: two roundings of values up to ~2x |y| (bias and product "
        "may cancel): 2 * 2 * 2^-9 < 4 * 2^-8",
    ),
    ("ia3_linear.backward", torch.float32): Tolerance(1e-5, 1.3e-6),
    ("ia3_linear.backward", torch.float64): Tolerance(1e-7, 1e-7),
    ("ia3_linear.backward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2,
        "g * l and g W are rounded to bf16 before the next product, and grad_l reads the "
        "bf16-rounded output: two or three roundings as in the forward",
    ),
    ("houlsby_adapter.forward", torch.float32): Tolerance(1e-5, 1.3e-6),
    ("houlsby_adapter.forward", torch.float64): Tolerance(1e-7, 1e-7),
    ("houlsby_adapter.forward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2,
        "z, act(z) and the output are each rounded to bf16 (three roundings of values up to "
        "~2x |out|), as lora_linear.forward",
    ),
    ("houlsby_adapter.backward", torch.float32): Tolerance(1e-5, 1.3e-6),
    ("houlsby_adapter.backward", torch.float64): Tolerance(1e-7, 1e-7),
    ("houlsby_adapter.backward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2,
        "g Wu, the activation derivative and the products after it are rounded to bf16, and "
        "z is the forward's bf16-rounded pre-activation: three roundings as in the forward",
    ),
    ("lora_multi_add.forward", torch.float32): Tolerance(1e-5, 1.3e-6),
    ("lora_multi_add.forward", torch.float64): Tolerance(1e-7, 1e-7),
    ("lora_multi_add.forward", torch.bfloat16): Tolerance(
        2 * _BF16_EPS, 1.6e-2,
        "the kernel widens to float32 and rounds the output once (<= 2^-9 of max|out|)",
    ),
    # The parity harness (tests/ops/test_parity.py): every op's kernel against its reference in
    # float64, scaled by max(1, max|expected|), on small odd shapes (at most 40 summed terms).
    ("parity.forward", torch.float32): Tolerance(
        1e-5, 1.3e-6, "float32 sums of at most 40 O(1) products, as lora_linear.forward",
    ),
    ("parity.forward", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2,
        "the loosest single-op bf16 entry above (lora_linear.forward: up to three roundings "
        "to bf16 on ATen's 16-bit path); the inputs themselves are exact in float64",
    ),
    # Plugins in PEFTREG_KERNELS=auto (fused ops) vs reference (plain PyTorch) on a tiny model,
    # both in the same dtype: float32 sums in different orders through a few layers.
    ("adapters.plugin_paths", torch.float32): Tolerance(1e-5, 1e-4),
    ("adapters.plugin_paths", torch.bfloat16): Tolerance(
        8 * _BF16_EPS, 1.6e-2,
        "both paths round to bf16, at different points (the fused ops round fewer "
        "intermediates), and the differences pass through two transformer layers",
    ),
    # Per-row training of several adapters in one bf16 batch (peftreg::lora_grouped_add) against
    # training each alone on its rows, adapter gradients of a tiny model.
    ("per_row.vs_alone", torch.float32): Tolerance(1e-5, 1e-4),
    ("per_row.vs_alone", torch.bfloat16): Tolerance(
        4 * _BF16_EPS, 1.6e-2,
        "slack on top of twice the error of training alone in bf16 (both against float64): "
        "bf16 gradients through two layers err by several percent of their largest entry on "
        "either path (measured up to 0.07 scaled), so the test bounds the batch's error by "
        "the alone path's rather than by a fixed figure",
    ),
    # A QLoRA model with bf16 compute merged into dense float32 layers against the same model
    # unmerged: the unmerged layers round input, product and output to bf16, the merged ones
    # do not, through every layer of the tiny model.
    ("qlora.merged_vs_unmerged", torch.bfloat16): Tolerance(
        8 * _BF16_EPS, 1.6e-2, "as adapters.plugin_paths: bf16 roundings on one side only",
    ),
    # A method plugin against HF PEFT 0.21.2 on the same tiny model with the same tensors
    # (tests/peft_twin.py): logits, merged logits and adapter gradients. The bar is
    # atol 1e-5 with no relative slack; both compute the same float32 operations (LoHa, LoKr:
    # measured 0; OFT: at most 1.1e-7, merged in float64 by peftreg, float32 by PEFT).
    ("peft_parity", torch.float32): Tolerance(
        1e-5, 0.0, "absolute only, the issue's bar; measured at most 1.1e-7"),
    # LoReFT against the float64 transcription of its equation (tests/plugins/test_loreft.py).
    ("loreft.vs_equation", torch.float64): Tolerance(1e-7, 1e-7),
    # QLoRA sharded by FSDP2 over 2 ranks vs one process on the whole batch
    # (tests/distributed/test_fsdp_qlora.py): losses, adapter after SGD steps, reloaded logits.
    ("fsdp.vs_single_process", torch.float32): Tolerance(1e-5, 1.3e-6),
}


def tol(check: str, dtype: torch.dtype) -> dict[str, float]:
    """``{"atol": ..., "rtol": ...}`` for ``torch.testing.assert_close``.

    Raises:
        KeyError: no entry for ``(check, dtype)``; add one here (with a reason if loosened).
    """
    try:
        entry = TOLERANCES[(check, dtype)]
    except KeyError:
        raise KeyError(f"tests/tolerances.py has no entry for ({check!r}, {dtype})") from None
    return {"atol": entry.atol, "rtol": entry.rtol}


def scaled_close(actual: torch.Tensor, expected: torch.Tensor, check: str, dtype: torch.dtype,
                 what: str = "") -> None:
    """assert_close with :func:`tol` after dividing both sides by ``max(1, max|expected|)``.

    Kernel outputs are compared in float64 on the CPU; the scaling turns the table's atol into
    an error relative to the largest expected value, as the table's entries assume.
    """
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, what
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual / scale, expected / scale, **tol(check, dtype),
                               msg=lambda m: f"{what}: {m}" if what else m)
