"""The writer stack's CPU matmuls (sheafprune/blas.py), on both paths (OpenBLAS, taken where torch's MKL runs on a
CPU not Intel's, and torch's own), against torch's at sizes that split a read over workers, and the stack's read and
gradients through them against plain autograd."""

import pytest
import torch

from sheafprune import blas
from sheafprune.blas import add_outer, cpu_vendor, small_by_wide
from sheafprune.stack import Stream

N_SPLIT = 3 * 8192 + 17  # wide enough for a read to split into blocks


@pytest.fixture(params=["openblas", "torch"])
def path(request, monkeypatch):
    """Either path, whatever this CPU's vendor: the choice is made afresh and undone after the test."""
    monkeypatch.setattr(blas, "mkl_off_intel", lambda: request.param == "openblas")
    monkeypatch.setattr(blas, "_OPENBLAS", None)
    return request.param


def test_cpu_vendor_decides_the_path(monkeypatch):
    intel = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\n"
    assert cpu_vendor(intel) == "GenuineIntel"
    assert cpu_vendor("vendor_id : AuthenticAMD\n") == "AuthenticAMD"
    assert cpu_vendor("processor : 0\n") == ""  # e.g. an ARM CPU's cpuinfo
    for vendor, mkl, want in [("GenuineIntel", True, False), ("", True, False), ("AuthenticAMD", False, False),
                              ("AuthenticAMD", True, True)]:
        monkeypatch.setattr(blas, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
        assert blas.mkl_off_intel() is want, (vendor, mkl)
    monkeypatch.setattr(blas, "mkl_off_intel", lambda: False)
    monkeypatch.setattr(blas, "_OPENBLAS", None)
    assert not blas._use_openblas(torch.zeros(2, 3))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
def test_read_and_outer_equal_torch(dtype, tol, path):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 37, generator=g, dtype=dtype)
    b = torch.randn(37, N_SPLIT, generator=g, dtype=dtype)
    out = small_by_wide(a, b)
    diff = (out - a @ b).abs().max().item()
    print(f"{path} read vs torch: {diff:.2e}")
    assert out.shape == (5, N_SPLIT) and out.is_contiguous() and diff < tol

    buf = torch.full((40, N_SPLIT), float("nan"), dtype=dtype)  # uninitialized rows: beta 0 must not read them
    m, gr = torch.rand(37, 5, generator=g, dtype=dtype), torch.randn(5, N_SPLIT, generator=g, dtype=dtype)
    add_outer(buf[1:38], m, gr, accumulate=False)
    first = (buf[1:38] - m @ gr).abs().max().item()
    add_outer(buf[1:38], m, gr, accumulate=True)
    second = (buf[1:38] - 2 * (m @ gr)).abs().max().item()
    print(f"{path} outer vs torch: written {first:.2e}, accumulated {second:.2e}")
    assert first < tol and second < 2 * tol
    assert buf[0].isnan().all() and buf[38:].isnan().all()  # rows outside the block untouched


def test_read_does_not_depend_on_the_thread_count(monkeypatch):
    """The OpenBLAS path's fixed blocks: its result is the same bits whatever the thread count (torch's own matmuls
    make no such promise)."""
    monkeypatch.setattr(blas, "mkl_off_intel", lambda: True)
    monkeypatch.setattr(blas, "_OPENBLAS", None)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(16, 50, generator=g), torch.randn(50, N_SPLIT, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = small_by_wide(a, b)
        torch.set_num_threads(2)
        two = small_by_wide(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_other_dtypes_are_torch_matmuls():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(4, 9, generator=g).bfloat16(), torch.randn(9, N_SPLIT, generator=g).bfloat16()
    assert torch.equal(small_by_wide(a, b), a @ b)
    c, m, gr = torch.zeros(9, N_SPLIT).bfloat16(), torch.rand(9, 4).bfloat16(), torch.randn(4, N_SPLIT).bfloat16()
    add_outer(c, m, gr, accumulate=True)
    assert torch.equal(c, torch.zeros(9, N_SPLIT).bfloat16().addmm_(m, gr))


def test_stack_read_and_gradients_equal_autograd(path):
    """Two reads, the second reaching rows the first did not (their gradient is written, then added to), at a
    split size: the reads, the mask gradients and the writers' gradients equal a dense autograd reference."""
    g = torch.Generator().manual_seed(3)
    b_, t, d = 4, 7, N_SPLIT // 28 + 1
    chunks = [torch.randn(n, b_, t, d, generator=g, requires_grad=True) for n in (2, 3, 1)]
    masks = [torch.rand(2, 4, generator=g, requires_grad=True), torch.rand(5, 3, generator=g, requires_grad=True)]
    weights = [torch.randn(4, b_, t, d, generator=g), torch.randn(3, b_, t, d, generator=g)]

    stream = Stream(n_writers=6, keep_chunks=True)
    stream.add(chunks[0])
    out0 = stream.read(masks[0])
    stream.add(chunks[1])
    out1 = stream.read(masks[1])
    stream.add(chunks[2])
    ((out0 * weights[0]).sum() + (out1 * weights[1]).sum()).backward()
    assert chunks[2].grad is None  # written after the last read
    got = [c.grad.clone() for c in chunks[:2]] + [m.grad.clone() for m in masks]

    for x in chunks + masks:
        x.grad = None
    rows = torch.cat([c.reshape(c.shape[0], -1) for c in chunks])
    ref0 = (masks[0].t() @ rows[:2]).reshape(4, b_, t, d)
    ref1 = (masks[1].t() @ rows[:5]).reshape(3, b_, t, d)
    ((ref0 * weights[0]).sum() + (ref1 * weights[1]).sum()).backward()
    want = [c.grad for c in chunks[:2]] + [m.grad for m in masks]

    diffs = [(out0 - ref0).abs().max().item(), (out1 - ref1).abs().max().item()]
    diffs += [((x - y).abs().max() / y.abs().max()).item() for x, y in zip(got, want)]
    print(f"{path} reads, writer and mask gradients (relative) vs autograd:", " ".join(f"{x:.1e}" for x in diffs))
    assert max(diffs) < 1e-5
