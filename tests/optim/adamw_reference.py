# SPDX-License-Identifier: Apache-2.0
"""AdamW written from the paper for the tests, with float32 moments for any parameter dtype.

Loshchilov & Hutter 2019 ("Decoupled Weight Decay Regularization"), algorithm 2, with
torch.optim.AdamW's conventions: weight decay scaled by lr, bias-corrected moments, eps added
to the corrected square root. The parameter is widened to float32, updated, and rounded back
to its dtype once per step. Independent of peftreg's kernels; used where torch.optim.AdamW
itself cannot be the oracle (bf16 parameters, whose state torch keeps in bf16).
"""

from __future__ import annotations

import math

import torch


class ReferenceAdamW:
    def __init__(self, params, lr, betas, eps, weight_decay, maximize=False):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd, self.maximize = lr, betas, eps, weight_decay, \
            maximize
        self.m = [torch.zeros(p.shape, dtype=torch.float32) for p in self.params]
        self.v = [torch.zeros(p.shape, dtype=torch.float32) for p in self.params]
        self.t = [0] * len(self.params)

    @torch.no_grad()
    def step(self):
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            self.t[i] += 1
            t = self.t[i]
            g = p.grad.float()
            if self.maximize:
                g = -g
            x = p.float() * (1 - self.lr * self.wd)
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            m_hat_scale = self.lr / (1 - beta1**t)
            denom = self.v[i].sqrt() / math.sqrt(1 - beta2**t) + self.eps
            x = x - m_hat_scale * self.m[i] / denom
            p.copy_(x.to(p.dtype))
