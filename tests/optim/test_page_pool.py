# SPDX-License-Identifier: Apache-2.0
"""The page pool's backing tier: failures give clear errors and lose nothing; files go away."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from adamw_reference import ReferenceAdamW
from tolerances import tol

from peftreg.ops.paged import PagePool, PagingError
from peftreg.optim import PagedAdamW

PAGE = 4096
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3000,), (41, 33), (7,)]]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(500 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _open_fds_in(directory: Path) -> list[str]:
    """Targets of this process's open descriptors inside ``directory`` (deleted files too)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + os.sep):
            found.append(target)
    return found


def test_page_round_trip_through_the_backing_tier(require_pool, tmp_path):
    pool = PagePool(page_bytes=PAGE, budget_bytes=2 * PAGE, backing_dir=tmp_path)
    pool.add_pages(6)
    pages = [torch.randn(PAGE // 4) for _ in range(6)]
    for i, values in enumerate(pages):
        pool.write_page(i, values)
    assert pool.counters()["resident_bytes"] <= 2 * PAGE
    assert pool.counters()["pages_out"] >= 4
    for i, values in enumerate(pages):
        assert torch.equal(pool.read_page(i), values)
    assert pool.counters()["pages_in"] >= 4
    assert torch.equal(pool.read_page(5), pages[5])  # twin: reads are not all one page
    assert not torch.equal(pool.read_page(4), pages[5])
    with pytest.raises(RuntimeError, match="page 6 does not exist"):
        pool.read_page(6)
    pool.close()


def test_missing_backing_dir_is_refused_before_training(require_pool, tmp_path):
    with pytest.raises(PagingError, match="does not exist"):
        PagedAdamW(_params(), budget_fraction=0.1, page_bytes=PAGE,
                   backing_dir=tmp_path / "nowhere")


def test_unwritable_backing_dir_is_refused_before_training(require_pool, tmp_path):
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o500)
    if os.access(directory, os.W_OK):  # root ignores permissions: use a kernel file system
        directory = Path("/proc")
    try:
        with pytest.raises(PagingError, match=f"cannot create the backing file in directory "
                                              f"'{directory}'"):
            PagedAdamW(_params(), budget_fraction=0.1, page_bytes=PAGE, backing_dir=directory)
    finally:
        (tmp_path / "read-only").chmod(0o700)


def test_full_disk_is_reported_before_training(require_pool, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk, in a child process."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from peftreg.optim import PagedAdamW, PagingError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        params = [torch.nn.Parameter(torch.zeros(100_000))]
        try:
            PagedAdamW(params, budget_fraction=0.1, page_bytes={PAGE},
                       backing_dir={str(tmp_path)!r})
        except PagingError as exc:
            print("ERROR:", exc)
        else:
            print("NO ERROR")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR:" in proc.stdout, proc.stdout
    assert f"backing directory '{tmp_path}' cannot hold" in proc.stdout
    assert "File too large" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_failing_page_out_mid_step_loses_nothing(require_pool, tmp_path):
    ours, ref_params = _params(), _params()
    paged = PagedAdamW(ours, **HYPER, page_bytes=PAGE, budget_bytes=2 * PAGE,
                       backing_dir=tmp_path)
    reference = ReferenceAdamW(ref_params, HYPER["lr"], HYPER["betas"], HYPER["eps"],
                               HYPER["weight_decay"])
    for step in range(3):
        _set_grads(ours, step)
        _set_grads(ref_params, step)
        paged.step()
        reference.step()
    paged.pool.inject_write_failure(1)  # one more page-out works, the next ones fail
    _set_grads(ours, 3)
    _set_grads(ref_params, 3)
    with pytest.raises(PagingError, match=r"No space left on device.*No optimizer state was lost"):
        paged.step()
    reference.step()
    assert paged.counters()["resident_bytes"] > 2 * PAGE  # kept resident rather than dropped
    # The failing step completed: parameters and every moment equal the reference, and a
    # checkpoint can be read while the backing tier still fails.
    for a, b in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(a, b, **tol("paged_adamw.vs_torch", torch.float32))
    state = paged.state_dict()["state"]
    for i in range(len(ours)):
        torch.testing.assert_close(state[i]["exp_avg"], reference.m[i],
                                   **tol("paged_adamw.vs_torch", torch.float32))
        torch.testing.assert_close(state[i]["exp_avg_sq"], reference.v[i],
                                   **tol("paged_adamw.vs_torch", torch.float32))
    # Once the backing tier works again, training goes on under the budget and stays equal.
    paged.pool.inject_write_failure(-1)
    for step in range(4, 8):
        _set_grads(ours, step)
        _set_grads(ref_params, step)
        paged.step()
        reference.step()
    assert paged.counters()["resident_bytes"] <= 2 * PAGE
    for a, b in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(a, b, **tol("paged_adamw.vs_torch", torch.float32))
    paged.close()


def test_backing_file_is_unlinked_at_once_and_released_at_close(require_pool, tmp_path):
    params = _params()
    paged = PagedAdamW(params, page_bytes=PAGE, budget_fraction=0.1, backing_dir=tmp_path)
    _set_grads(params, 0)
    paged.step()
    assert paged.counters()["pages_out"] > 0  # the file is in use
    assert list(tmp_path.iterdir()) == []  # never visible in the directory
    held = _open_fds_in(tmp_path)
    assert len(held) == 1 and held[0].endswith("(deleted)"), held
    paged.close()
    assert _open_fds_in(tmp_path) == []
    with pytest.raises(RuntimeError, match="closed page pool"):
        paged.step()


def test_default_backing_dir_removed_at_close_and_at_exit(require_pool):
    paged = PagedAdamW(_params(), page_bytes=PAGE, budget_fraction=0.1)
    directory = paged.pool.backing_dir
    assert directory.is_dir()
    paged.close()
    assert not directory.exists()

    script = textwrap.dedent(f"""
        import torch
        from peftreg.optim import PagedAdamW
        p = [torch.nn.Parameter(torch.zeros(5000))]
        opt = PagedAdamW(p, page_bytes={PAGE}, budget_fraction=0.1)
        p[0].grad = torch.ones(5000)
        opt.step()
        assert opt.counters()["pages_out"] > 0
        print(opt.pool.backing_dir)
    """)  # exits without close()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    left = Path(proc.stdout.strip().splitlines()[-1])
    assert left.name.startswith("peftreg-paged-")
    assert not left.exists()


def test_without_the_extension_the_error_says_how_to_build():
    script = textwrap.dedent("""
        import torch
        from peftreg.ops import ExtensionUnavailableError
        from peftreg.optim import PagedAdamW
        try:
            PagedAdamW([torch.nn.Parameter(torch.zeros(3))])
        except ExtensionUnavailableError as exc:
            print("ERROR:", exc)
    """)
    env = {**os.environ, "PEFTREG_EXTENSION": "off"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: peftreg's page pool (PagedAdamW) needs the compiled extension" in proc.stdout
    assert "setup.py build_ext --inplace" in proc.stdout
