"""The writer stack's two largest CPU matmuls through OpenBLAS (numpy's and scipy's), one thread per call.

Both have a 16-wide side (the readers of one layer) and a side of B*T*D: out (R, N) = mask^T (R, W) @ S (W, N)
for a read, and G (W, N) += mask (W, R) @ grad (R, N) for its writers' gradient. On a 2-core AVX2 EPYC, torch's MKL
took 76-108 ms and 42-90 ms for them at SmolLM2's largest read (W = 291, N = 156,672); single-threaded OpenBLAS 44-52
ms and 30-39 ms, and the read split over two workers 29-41 ms (`docs/step-cost.md`). OpenBLAS's own threads
busy-wait after every call and took a core from torch's, so its libraries run one thread each (set once, at the
first such call, for the rest of the process), and a read is split into fixed blocks of columns shared by as many
workers as torch has threads: the blocks do not depend on the thread count, and neither does the result.

On an AVX-512 Intel Xeon, MKL is the faster one (read 28-33 ms against OpenBLAS's 43-45, writers' gradient 14 against
23): MKL picks its kernels by CPU vendor and gives other vendors' CPUs generic ones. So these products go to OpenBLAS
only where torch's BLAS is MKL and the CPU is not Intel's (the vendor is read once, from /proc/cpuinfo); elsewhere
(an Intel CPU, another device or dtype, a torch built on another BLAS, or a BLAS other than OpenBLAS behind numpy)
they are plain torch matmuls.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

_POOL: Optional[tuple[int, ThreadPoolExecutor]] = None  # (workers, pool)
_OPENBLAS: Optional[bool] = None  # whether numpy's and scipy's BLAS is OpenBLAS, now limited to one thread
_BLOCK = 8192  # columns a read's job; fixed, so that every column is summed the same way whatever the thread count


def cpu_vendor(cpuinfo: Optional[str] = None) -> str:
    """The CPU's vendor id (e.g. GenuineIntel, AuthenticAMD) from /proc/cpuinfo's text; "" where it is unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


def mkl_off_intel() -> bool:
    """Whether torch's matmuls run on MKL on a CPU that is known not to be Intel's (MKL's generic kernels)."""
    return torch.backends.mkl.is_available() and cpu_vendor() not in ("", "GenuineIntel")


def _use_openblas(*ts: Tensor) -> bool:
    """CPU tensors of one float dtype, MKL behind torch on a CPU not Intel's, and OpenBLAS behind numpy and scipy
    (limited to one thread at the first call; other BLAS libraries, e.g. an MKL that torch itself may use, are left
    alone)."""
    global _OPENBLAS
    if not all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in ts) or \
            len({t.dtype for t in ts}) != 1:
        return False
    if _OPENBLAS is None:
        if not mkl_off_intel():
            _OPENBLAS = False
            return False
        import scipy.linalg  # noqa: F401  (loads scipy's BLAS, so that the controller sees it)
        from threadpoolctl import ThreadpoolController
        libs = ThreadpoolController().select(user_api="blas")
        _OPENBLAS = bool(libs.lib_controllers) and all(c.internal_api == "openblas" for c in libs.lib_controllers)
        if _OPENBLAS:
            libs.limit(limits=1)
    return _OPENBLAS


def _workers() -> int:
    return max(1, torch.get_num_threads())


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != _workers():
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = (_workers(), ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="sheafprune-blas"))
    return _POOL[1]


def small_by_wide(a: Tensor, b: Tensor) -> Tensor:
    """a (R, W) @ b (W, N), b's rows contiguous; a new contiguous (R, N)."""
    if not b.is_contiguous() or not _use_openblas(a, b):
        return a @ b
    a_np = a.detach().contiguous().numpy()
    b_np = b.detach().numpy()
    out = torch.empty(a.shape[0], b.shape[1], dtype=b.dtype)
    out_np, n = out.numpy(), b.shape[1]
    blocks = [(lo, min(lo + _BLOCK, n)) for lo in range(0, n, _BLOCK)]
    if len(blocks) == 1 or _workers() == 1:
        for lo, hi in blocks:
            np.matmul(a_np, b_np[:, lo:hi], out=out_np[:, lo:hi])
        return out
    jobs = [_pool().submit(np.matmul, a_np, b_np[:, lo:hi], out=out_np[:, lo:hi]) for lo, hi in blocks]
    for job in jobs:
        job.result()
    return out


def add_outer(c: Tensor, a: Tensor, b: Tensor, *, accumulate: bool) -> None:
    """c (W, N) = [c +] a (W, R) @ b (R, N), in place; c's rows contiguous (a block of rows of a buffer)."""
    if not c.is_contiguous() or not _use_openblas(c, a, b):
        if accumulate:
            c.addmm_(a, b)
        else:
            torch.mm(a, b, out=c)
        return
    from scipy.linalg import blas
    gemm = blas.dgemm if c.dtype == torch.float64 else blas.sgemm
    # c^T (N, W) is c's memory in Fortran order: c^T = b^T @ a^T, written in place
    c_t = c.detach().numpy().T
    out = gemm(1.0, b.detach().numpy().T, a.detach().numpy().T, beta=1.0 if accumulate else 0.0, c=c_t,
               overwrite_c=True)
    if not np.shares_memory(out, c_t):  # scipy copied c (it never should for a Fortran-ordered c)
        c.copy_(torch.from_numpy(out.T))
