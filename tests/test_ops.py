"""Tests for tsv_fast.ops.reconstruct: compiled CPU op, CPU emulation of the CUDA kernel,
pure-PyTorch fallback and (when a GPU is visible) the CUDA kernel, all against a
float64 reference computed independently."""

import pytest
import torch

from op_checks import refuses_grad_inputs
from tsv_fast import ops

EXT_OK, EXT_WHY = ops.load_extension()
needs_ext = pytest.mark.skipif(not EXT_OK, reason=EXT_WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
needs_cuda_ext = pytest.mark.skipif(
    not (EXT_OK and ops.has_cuda_kernels()), reason="extension built without CUDA kernels"
)

BASE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FACTOR_DTYPES = [torch.float32, torch.bfloat16]
# (m, n, k): odd sizes that are not multiples of the 64x64 tile / 16-wide k chunk.
SIZES = [(1, 1, 1), (37, 53, 5), (130, 70, 17), (3, 3, 0), (65, 129, 33), (0, 4, 2), (4, 0, 2)]
ALPHA = -0.7


def make_inputs(m, n, k, batch=None, base_dtype=torch.float32, factor_dtype=torch.float32,
                device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    base = torch.randn(*lead, m, n, generator=g).to(base_dtype)
    U = torch.randn(*lead, m, k, generator=g).to(factor_dtype)
    S = torch.rand(*lead, k, generator=g).add(0.5).to(factor_dtype)
    V = torch.randn(*lead, n, k, generator=g).to(factor_dtype)
    return tuple(t.to(device) for t in (base, U, S, V))


def reference(base, U, S, V, alpha):
    """float64 result plus the magnitude scale used for tolerances."""
    b, u, s, v = (t.detach().cpu().double() for t in (base, U, S, V))
    ref = b + alpha * (u * s.unsqueeze(-2)) @ v.transpose(-1, -2)
    scale = b.abs() + abs(alpha) * (u.abs() * s.abs().unsqueeze(-2)) @ v.abs().transpose(-1, -2)
    return ref, scale


def assert_close_to_ref(out, base, U, S, V, alpha, slack=1.0):
    assert out.dtype == base.dtype and out.shape == base.shape and out.device == base.device
    ref, scale = reference(base, U, S, V, alpha)
    acc_eps = 1e-12 if torch.float64 in (base.dtype, U.dtype) else 1e-5  # accumulation error
    out_eps = torch.finfo(base.dtype).eps  # one rounding of the output (<= 1 ulp)
    tol = slack * (acc_eps * scale + out_eps * ref.abs() + torch.finfo(base.dtype).smallest_normal)
    err = (out.detach().cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, max excess {(err - tol).max().item():.3g}"


CASES = [
    pytest.param(size, batch, bd, fd, id=f"{size}-B{batch}-{str(bd)[6:]}-{str(fd)[6:]}")
    for size in SIZES
    for batch in (None, 3)
    for bd in BASE_DTYPES
    for fd in FACTOR_DTYPES
]


def run_impl(impl, *args):
    if impl == "op":
        return torch.ops.tsv_fast.reconstruct(*args)
    if impl == "emulated":
        return torch.ops.tsv_fast.reconstruct_emulated(*args)
    if impl == "fallback":
        return ops._reconstruct_torch(*args)
    return ops.reconstruct(*args)


@pytest.mark.parametrize("impl", [
    pytest.param("op", marks=needs_ext),
    pytest.param("emulated", marks=needs_ext),
    "fallback",
    "public",
])
@pytest.mark.parametrize("size,batch,base_dtype,factor_dtype", CASES)
def test_reconstruct_matches_reference(impl, size, batch, base_dtype, factor_dtype):
    args = make_inputs(*size, batch=batch, base_dtype=base_dtype, factor_dtype=factor_dtype)
    out = run_impl(impl, *args, ALPHA)
    assert_close_to_ref(out, *args, ALPHA)


@needs_ext
@pytest.mark.parametrize("size,batch,base_dtype,factor_dtype", CASES)
def test_emulated_matches_cpu_op(size, batch, base_dtype, factor_dtype):
    args = make_inputs(*size, batch=batch, base_dtype=base_dtype, factor_dtype=factor_dtype)
    emu = torch.ops.tsv_fast.reconstruct_emulated(*args, ALPHA)
    cpu = torch.ops.tsv_fast.reconstruct(*args, ALPHA)
    assert_close_to_ref(emu, *args, ALPHA)
    # Both round once from a float32/float64 accumulator: within two output roundings.
    ref, scale = reference(*args, ALPHA)
    tol = 2e-5 * scale + 2 * torch.finfo(base_dtype).eps * ref.abs() + 1e-30
    assert bool(((emu.double() - cpu.double()).abs() <= tol).all())


@pytest.mark.parametrize("impl", [
    pytest.param("op", marks=needs_ext), pytest.param("emulated", marks=needs_ext), "fallback"])
def test_float64_factors_and_noncontiguous(impl):
    base, U, S, V = make_inputs(70, 40, 20, base_dtype=torch.float16, factor_dtype=torch.float64, seed=1)
    # Same values, non-contiguous layouts.
    base_nc = base.t().contiguous().t()
    U_nc = torch.stack([U, U], dim=-1)[..., 0]
    V_nc = V.t().contiguous().t()
    S_nc = torch.stack([S, S], dim=1)[:, 0]
    assert not any(t.is_contiguous() for t in (base_nc, U_nc, V_nc, S_nc))
    out = run_impl(impl, base_nc, U_nc, S_nc, V_nc, 0.25)
    assert out.is_contiguous()
    assert_close_to_ref(out, base, U, S, V, 0.25)


@pytest.mark.parametrize("impl", [
    pytest.param("op", marks=needs_ext), pytest.param("emulated", marks=needs_ext), "fallback"])
def test_k0_is_copy_of_base(impl):
    base, U, S, V = make_inputs(5, 7, 0, batch=2, base_dtype=torch.bfloat16)
    out = run_impl(impl, base, U, S, V, 3.0)
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()


def test_public_wrapper_supports_autograd():
    base, U, S, V = make_inputs(6, 5, 3, base_dtype=torch.float64, factor_dtype=torch.float64)
    U.requires_grad_(True)
    ops.reconstruct(base, U, S, V, 2.0).sum().backward()
    torch.testing.assert_close(U.grad, 2.0 * (V.sum(0) * S).expand_as(U))


BAD_INPUTS = [
    # (description, builder, message regex)
    ("U wrong rows", lambda: (torch.zeros(5, 6), torch.zeros(4, 3), torch.zeros(3), torch.zeros(6, 3)),
     r"U\.size\(0\) must equal m \(rows of base\) = 5, but U has shape \[4, 3\] and base has shape \[5, 6\]"),
    ("V wrong rows", lambda: (torch.zeros(5, 6), torch.zeros(5, 3), torch.zeros(3), torch.zeros(7, 3)),
     r"V\.size\(0\) must equal n \(columns of base\) = 6"),
    ("V wrong k", lambda: (torch.zeros(5, 6), torch.zeros(5, 3), torch.zeros(3), torch.zeros(6, 2)),
     r"V\.size\(1\) must equal k \(columns of U\) = 3"),
    ("S wrong k", lambda: (torch.zeros(5, 6), torch.zeros(5, 3), torch.zeros(4), torch.zeros(6, 3)),
     r"S\.size\(0\) must equal k \(columns of U\) = 3"),
    ("batch mismatch", lambda: (torch.zeros(2, 5, 6), torch.zeros(3, 5, 3), torch.zeros(2, 3), torch.zeros(2, 6, 3)),
     r"U\.size\(0\) must equal the batch size B = base\.size\(0\) = 2"),
    ("base 1-D", lambda: (torch.zeros(5), torch.zeros(5, 3), torch.zeros(3), torch.zeros(6, 3)),
     r"base must be 2-D \(m, n\) or 3-D batched"),
    ("U wrong dim", lambda: (torch.zeros(5, 6), torch.zeros(1, 5, 3), torch.zeros(3), torch.zeros(6, 3)),
     r"U must be 2-D"),
    ("S wrong dim", lambda: (torch.zeros(5, 6), torch.zeros(5, 3), torch.zeros(1, 3), torch.zeros(6, 3)),
     r"S must be 1-D"),
    ("integer base", lambda: (torch.zeros(5, 6, dtype=torch.int32), torch.zeros(5, 3), torch.zeros(3), torch.zeros(6, 3)),
     r"base must have a floating dtype"),
    ("factor dtypes differ", lambda: (torch.zeros(5, 6), torch.zeros(5, 3), torch.zeros(3, dtype=torch.float64), torch.zeros(6, 3)),
     r"S has dtype .* but U has dtype"),
    ("different devices", lambda: (torch.zeros(5, 6), torch.zeros(5, 3, device="meta"), torch.zeros(3), torch.zeros(6, 3)),
     r"U is on meta but base is on cpu"),
]


@pytest.mark.parametrize("impl", [
    pytest.param("op", marks=needs_ext), pytest.param("emulated", marks=needs_ext), "fallback"])
@pytest.mark.parametrize("desc,build,msg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(impl, desc, build, msg):
    with pytest.raises(ValueError, match=msg):
        run_impl(impl, *build(), 1.0)


@pytest.mark.parametrize("desc,build,msg", BAD_INPUTS + [
    ("U 0-D", lambda: (torch.zeros(5, 6), torch.tensor(1.0), torch.zeros(3), torch.zeros(6, 3)), r"U must be 2-D")],
    ids=[b[0] for b in BAD_INPUTS] + ["U 0-D"])
def test_public_wrapper_raises_the_same_errors(desc, build, msg):
    with pytest.raises(ValueError, match=msg):
        ops.reconstruct(*build(), 1.0)


@pytest.mark.parametrize("impl", [
    pytest.param("op", marks=needs_ext), pytest.param("emulated", marks=needs_ext), "fallback", "public"])
@pytest.mark.parametrize("alpha", [1e39, -1e39, float("inf"), float("nan")])
def test_alpha_must_be_finite_within_float32_on_every_path(impl, alpha):
    """The CPU op raised RuntimeError for |alpha| > float32 max and the kernels returned Inf/NaN."""
    with pytest.raises(ValueError, match=r"alpha must be a finite number within the float32 range"):
        run_impl(impl, *make_inputs(6, 5, 3), alpha)


@needs_ext
@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_nonfinite_factors_give_the_same_nan_and_inf_on_every_path(alpha, batch):
    """With alpha = 0 the CPU op used to return base for 2-D inputs (its GEMM skipped the product)
    and the kernel NaN (0 * Inf): now every path gives what the kernel computes."""
    base, U, S, V = make_inputs(6, 5, 3, batch=batch)
    U[..., 1, 0] = float("inf")  # row 1
    V[..., 2, 1] = float("nan")  # column 2
    outs = {impl: run_impl(impl, base, U, S, V, alpha) for impl in ("op", "emulated", "fallback", "public")}
    want = outs["emulated"]  # the CUDA kernel's arithmetic
    assert not want[..., 1, :].isfinite().any() and want[..., 2].isnan().all() and want[..., 0, 0].isfinite().all()
    for impl, out in outs.items():
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(out), kind(want)), (impl, kind.__name__)


@needs_ext
@pytest.mark.parametrize("op_name", ["reconstruct", "reconstruct_emulated"])
def test_ops_refuse_inputs_that_require_grad(op_name):
    """The ops have no derivative: with grad mode on, autograd's fallback used to hand back
    outputs that required grad, with a real graph on the CPU op (its ATen calls) and none
    behind the emulated one."""
    base, U, S, V = make_inputs(6, 5, 3)
    out = refuses_grad_inputs(op_name, (base.requires_grad_(), U, S, V, 0.5), "base")
    assert not out.requires_grad
    assert_close_to_ref(out, base, U, S, V, 0.5)


@needs_ext
def test_fake_kernels_come_with_the_ops():
    """The fakes used to be registered only by ops.load_extension(): importing tsv_fast._C (or
    reaching the ops another way) left torch.compile without them."""
    import subprocess
    import sys

    code = ("import torch, tsv_fast._C\n"
            "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "with FakeTensorMode():\n"
            "    out = torch.ops.tsv_fast.reconstruct(torch.empty(4, 9), torch.empty(4, 2), torch.empty(2),\n"
            "                                         torch.empty(9, 2), 1.0)\n"
            "assert out.shape == (4, 9)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@needs_ext
@pytest.mark.parametrize("op_name", ["reconstruct", "reconstruct_emulated"])
@pytest.mark.parametrize("size,batch,base_dtype,factor_dtype", [
    ((37, 53, 5), None, torch.float32, torch.float32),
    ((9, 4, 3), 2, torch.bfloat16, torch.float32),
    ((3, 3, 0), None, torch.float64, torch.bfloat16),
])
def test_opcheck(op_name, size, batch, base_dtype, factor_dtype):
    args = make_inputs(*size, batch=batch, base_dtype=base_dtype, factor_dtype=factor_dtype)
    torch.library.opcheck(getattr(torch.ops.tsv_fast, op_name).default, (*args, 0.5))


@needs_ext
def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        base, U, S, V = make_inputs(4, 9, 2, batch=3, base_dtype=torch.float16)
        out = torch.ops.tsv_fast.reconstruct(base, U, S, V, 1.0)
        with pytest.raises(ValueError, match=r"^reconstruct_emulated: U\.size\(1\) must equal m"):  # its own name
            torch.ops.tsv_fast.reconstruct_emulated(base, U[:, :3], S, V, 1.0)
        with pytest.raises(ValueError, match="reconstruct: alpha must be a finite number"):
            torch.ops.tsv_fast.reconstruct(base, U, S, V, float("inf"))
    assert out.shape == (3, 4, 9) and out.dtype == torch.float16


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

@needs_cuda
@needs_cuda_ext
@pytest.mark.parametrize("size,batch,base_dtype,factor_dtype", CASES + [
    pytest.param((300, 257, 70), 2, torch.float32, torch.float32, id="large-f32"),
    pytest.param((300, 257, 70), 2, torch.bfloat16, torch.bfloat16, id="large-bf16"),
])
def test_cuda_matches_cpu_op_and_reference(size, batch, base_dtype, factor_dtype):
    args = make_inputs(*size, batch=batch, base_dtype=base_dtype, factor_dtype=factor_dtype, device="cuda")
    out = torch.ops.tsv_fast.reconstruct(*args, ALPHA)
    assert_close_to_ref(out, *args, ALPHA)
    cpu = torch.ops.tsv_fast.reconstruct(*(t.cpu() for t in args), ALPHA)
    ref, scale = reference(*args, ALPHA)
    tol = 2e-5 * scale + 2 * torch.finfo(base_dtype).eps * ref.abs() + 1e-30
    assert bool(((out.cpu().double() - cpu.double()).abs() <= tol).all())
    assert_close_to_ref(ops.reconstruct(*args, ALPHA), *args, ALPHA)  # public wrapper on CUDA


@needs_cuda
@needs_cuda_ext
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_cuda_public_wrapper_at_merge_ranks(base_dtype, monkeypatch):
    """From rank 256 on the wrapper takes cuBLAS's addmm on a GPU: same result, same dtype rules."""
    torch_path = ops._reconstruct_torch
    args = make_inputs(300, 280, 270, batch=2, base_dtype=base_dtype, device="cuda")
    calls = []
    monkeypatch.setattr(ops, "_reconstruct_torch", lambda *a: calls.append(1) or torch_path(*a))
    out = ops.reconstruct(*args, ALPHA)
    assert calls  # the addmm route was taken
    assert out.dtype == base_dtype and out.is_contiguous()
    assert_close_to_ref(out, *args, ALPHA)
    assert_close_to_ref(ops.reconstruct(*(a[0] for a in args), ALPHA), *(a[0] for a in args), ALPHA)


@needs_cuda
@needs_cuda_ext
def test_cuda_noncontiguous_and_bad_device():
    base, U, S, V = make_inputs(70, 40, 20, base_dtype=torch.float16, factor_dtype=torch.float64, device="cuda")
    out = torch.ops.tsv_fast.reconstruct(base.t().contiguous().t(), U, S, V.t().contiguous().t(), 0.25)
    assert_close_to_ref(out, base, U, S, V, 0.25)
    with pytest.raises(ValueError, match=r"is on cpu but base is on cuda"):
        torch.ops.tsv_fast.reconstruct(base, U.cpu(), S, V, 1.0)


@needs_cuda
@needs_cuda_ext
def test_cuda_opcheck():
    args = make_inputs(37, 53, 5, batch=2, device="cuda")
    torch.library.opcheck(torch.ops.tsv_fast.reconstruct.default, (*args, 0.5))
