"""Tests for the segmented low-rank apply (SGMV): tsv_fast.ops.segmented_lowrank_apply_packed
and pack_factors, the compiled CPU op, the CPU emulation of the CUDA kernels, the pure-PyTorch
fallback and (when a GPU is visible) the CUDA kernels, all against an independent float64 loop."""

import pytest
import torch

from op_checks import refuses_grad_inputs
from tsv_fast import ops
from tsv_fast.errors import TSVInputError
from tsv_fast.runtime_ops import segmented_lowrank_apply

EXT_OK, EXT_WHY = ops.load_extension()
needs_ext = pytest.mark.skipif(not EXT_OK, reason=EXT_WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
needs_cuda_ext = pytest.mark.skipif(
    not (EXT_OK and ops.has_cuda_kernels()), reason="extension built without CUDA kernels"
)
ALPHA = -0.7

# (n, m, offsets, ranks per segment (None: no delta), N): odd sizes around the 64-row /
# 64-column tiles and 16-wide k chunks; empty, 1-row and rank-0 segments; rows outside
# every segment; m != n.
LAYOUTS = {
    "small": (7, 5, [0, 4, 4, 9, 11], [2, 3, None, 1], 11),
    "odd": (37, 70, [1, 2, 2, 67, 131], [5, 4, 17, 0], 133),
    "tiles": (130, 65, [0, 64, 193], [33, 16], 200),
    "one-seg": (16, 3, [3, 8], [16], 9),
    "no-seg": (4, 6, [2], [], 5),
}


def make_case(layout, x_dtype=torch.float32, factor_dtype=torch.float32, device="cpu", seed=0):
    n, m, offsets, ranks, N = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, n, generator=g).to(x_dtype)
    base = torch.randn(N, m, generator=g).to(x_dtype)
    Us, Ss, Vs = [], [], []
    for k in ranks:
        if k is None:
            Us.append(None), Ss.append(None), Vs.append(None)
        else:
            Us.append(torch.randn(m, k, generator=g).to(factor_dtype))
            Ss.append(torch.rand(k, generator=g).add(0.5).to(factor_dtype))
            Vs.append(torch.randn(n, k, generator=g).to(factor_dtype))
    def mv(ts):
        return [None if t is None else t.to(device) for t in ts]

    return x.to(device), base.to(device), offsets, mv(Us), mv(Ss), mv(Vs)


def reference(x, base, offsets, Us, Ss, Vs, alpha):
    """float64 result and magnitude scale, one plain loop over segments."""
    ref = base.detach().cpu().double().clone()
    scale = ref.abs()
    xd = x.detach().cpu().double()
    for i, (u, s, v) in enumerate(zip(Us, Ss, Vs)):
        a, b = offsets[i], offsets[i + 1]
        if u is None or b == a:
            continue
        u, s, v = (t.detach().cpu().double() for t in (u, s, v))
        ref[a:b] += alpha * (xd[a:b] @ v) * s @ u.T
        scale[a:b] += abs(alpha) * ((xd[a:b].abs() @ v.abs()) * s.abs()) @ u.abs().T
    return ref, scale


def assert_close_to_ref(out, x, base, offsets, Us, Ss, Vs, alpha):
    assert out.dtype == x.dtype and out.shape == base.shape and out.device == x.device
    ref, scale = reference(x, base, offsets, Us, Ss, Vs, alpha)
    f64 = x.dtype == torch.float64 or any(u is not None and u.dtype == torch.float64 for u in Us)
    tol = (1e-12 if f64 else 1e-5) * scale + torch.finfo(x.dtype).eps * ref.abs() + 1e-30
    err = (out.detach().cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, max excess {(err - tol).max().item():.3g}"
    # rows outside every segment (and in segments without a delta) are bit-identical
    covered = torch.zeros(base.shape[0], dtype=torch.bool)
    for i, u in enumerate(Us):
        if u is not None and u.shape[1] > 0:
            covered[offsets[i]:offsets[i + 1]] = True
    assert torch.equal(out.detach().cpu()[~covered], base.detach().cpu()[~covered])


def packed_args(x, offsets, Us, Ss, Vs, shape):
    U, S, V, ranks = ops.pack_factors(Us, Ss, Vs, shape=shape, device=x.device)
    return torch.tensor(offsets), torch.arange(len(Us)), U, S, V, ranks


def run(impl, x, base, offsets, Us, Ss, Vs, alpha):
    if impl == "list":
        return segmented_lowrank_apply(x, offsets, Us, Ss, Vs, out=base.clone(), alpha=alpha)
    offs, slots, U, S, V, ranks = packed_args(x, offsets, Us, Ss, Vs, (base.shape[1], x.shape[1]))
    if impl == "fallback":
        return ops._segmented_torch_(base.clone(), x, offs, slots, U, S, V, ranks, alpha)
    if impl == "public":
        return ops.segmented_lowrank_apply_packed(x, offsets, U, S, V, ranks, out=base.clone(), alpha=alpha)
    if impl.endswith("_"):  # in-place compiled ops
        out = base.clone()
        getattr(torch.ops.tsv_fast, impl)(out, x, offs, slots, U, S, V, ranks, alpha)
        return out
    return getattr(torch.ops.tsv_fast, impl)(base, x, offs, slots, U, S, V, ranks, alpha)


IMPLS = [
    pytest.param("segmented_lowrank_apply", marks=needs_ext, id="op"),
    pytest.param("segmented_lowrank_apply_", marks=needs_ext, id="op_"),
    pytest.param("segmented_lowrank_apply_emulated", marks=needs_ext, id="emulated"),
    pytest.param("segmented_lowrank_apply_emulated_", marks=needs_ext, id="emulated_"),
    "fallback",
    "public",
    "list",
]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
          (torch.float32, torch.bfloat16), (torch.float64, torch.float32)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("x_dtype,factor_dtype", DTYPES, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPES])
def test_matches_reference(impl, layout, x_dtype, factor_dtype):
    case = make_case(layout, x_dtype, factor_dtype)
    assert_close_to_ref(run(impl, *case, ALPHA), *case, ALPHA)


@needs_ext
def test_padding_is_ignored_and_slots_are_shared():
    """Garbage past each slot's rank must not leak in; two segments may share a slot; -1 = no delta."""
    g = torch.Generator().manual_seed(3)
    N, n, m, kmax = 70, 20, 33, 9
    x, base = torch.randn(N, n, generator=g), torch.randn(N, m, generator=g)
    U, S, V = torch.randn(2, m, kmax, generator=g), torch.rand(2, kmax, generator=g), torch.randn(2, n, kmax, generator=g)
    ranks, offsets, slots = torch.tensor([4, 9]), [0, 10, 30, 31, 70], [1, -1, 0, 1]
    Us = [U[p, :, :ranks[p]] if p >= 0 else None for p in slots]
    Ss = [S[p, :ranks[p]] if p >= 0 else None for p in slots]
    Vs = [V[p, :, :ranks[p]] if p >= 0 else None for p in slots]
    args = (torch.tensor(offsets), torch.tensor(slots), U, S, V, ranks, 1.5)
    for name in ("segmented_lowrank_apply", "segmented_lowrank_apply_emulated"):
        out = getattr(torch.ops.tsv_fast, name)(base, x, *args)
        assert_close_to_ref(out, x, base, offsets, Us, Ss, Vs, 1.5)
    out = ops._segmented_torch_(base.clone(), x, *args)
    assert_close_to_ref(out, x, base, offsets, Us, Ss, Vs, 1.5)


@needs_ext
def test_inplace_noncontiguous_out():
    x, base, offsets, Us, Ss, Vs = make_case("odd")
    offs, slots, U, S, V, ranks = packed_args(x, offsets, Us, Ss, Vs, (base.shape[1], x.shape[1]))
    for name in ("segmented_lowrank_apply_", "segmented_lowrank_apply_emulated_"):
        out = base.t().contiguous().t()  # column-major
        assert not out.is_contiguous()
        getattr(torch.ops.tsv_fast, name)(out, x, offs, slots, U, S, V, ranks, ALPHA)
        assert_close_to_ref(out, x, base, offsets, Us, Ss, Vs, ALPHA)


@needs_ext
@pytest.mark.parametrize("name", ["segmented_lowrank_apply_", "segmented_lowrank_apply_emulated_"])
def test_out_partly_overlapping_its_inputs_is_refused(name):
    """The CPU op reads x segment by segment, the CUDA kernel all of it first: with out partly
    over x they disagreed (by 10.6 in a review's case). out == x itself stays allowed."""
    g = torch.Generator().manual_seed(5)
    N, n, k = 8, 4, 2
    U, V = torch.randn(2, n, k, generator=g, dtype=torch.float64), torch.randn(2, n, k, generator=g, dtype=torch.float64)
    S, ranks = torch.ones(2, k, dtype=torch.float64), torch.tensor([2, 2])
    offs, slots = torch.tensor([0, 4, 8]), torch.tensor([0, 1])
    op = getattr(torch.ops.tsv_fast, name)
    store = torch.randn(N + 4, n, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="out must be x itself or share no memory with it"):
        op(store[4:], store[:N], offs, slots, U, S, V, ranks, 1.0)
    buf = torch.randn(N * n, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="out shares memory with U"):
        op(buf.view(N, n), store[:N], offs, slots, buf[:2 * n * k].view(2, n, k), S, V, ranks, 1.0)
    x = store[:N].clone()
    want = x.clone()
    for s, (lo, hi) in enumerate([(0, 4), (4, 8)]):
        want[lo:hi] += x[lo:hi] @ V[s] @ U[s].T  # out = x itself: every row reads its own x first
    op(x, x, offs, slots, U, S, V, ranks, 1.0)
    torch.testing.assert_close(x, want)


@needs_ext
@pytest.mark.parametrize("name", ["segmented_lowrank_apply_", "segmented_lowrank_apply_emulated_"])
def test_out_that_may_overlap_is_refused(name):
    """Layouts ATen cannot analyse (not dense) used to pass: an out whose rows overlap made the CPU
    op read rows it had already written (5.97 off the CUDA kernel), and an out slicing the storage
    of x or U went unchecked. A column slice of a separate tensor stays allowed."""
    g = torch.Generator().manual_seed(6)
    N, n, m, k = 8, 4, 5, 2
    f64 = dict(dtype=torch.float64)
    x = torch.randn(N, n, generator=g, **f64)
    U, V = torch.randn(1, m, k, generator=g, **f64), torch.randn(1, n, k, generator=g, **f64)
    S, ranks, offs, slots = torch.ones(1, k, **f64), torch.tensor([k]), torch.tensor([0, N]), torch.tensor([0])
    op = getattr(torch.ops.tsv_fast, name)
    for out in (torch.zeros(N + m, **f64).as_strided((N, m), (1, 1)),  # row i starts at element i
                torch.zeros(1, m, **f64).expand(N, m)):  # one row for all
        with pytest.raises(ValueError, match=r"out has elements that share memory"):
            op(out, x, offs, slots, U, S, V, ranks, 1.0)
    wide = torch.zeros(N, 2 * m, **f64)
    with pytest.raises(ValueError, match="out shares memory with U, which it reads"):
        op(wide[:, :m], x, offs, slots, wide.view(-1)[:m * k].view(1, m, k), S, V, ranks, 1.0)
    store = torch.randn(N, m + n, generator=g, **f64)
    with pytest.raises(ValueError, match="out must be x itself or share no memory with it"):
        op(store[:, :m], store[:, m - 1:m - 1 + n], offs, slots, U, S, V, ranks, 1.0)
    out = wide[:, :m]  # not dense, but its elements are distinct and its storage its own
    op(out, x, offs, slots, U, S, V, ranks, 1.0)
    torch.testing.assert_close(out, x @ V[0] @ U[0].T)
    assert torch.equal(wide[:, m:], torch.zeros(N, m, **f64))


@needs_ext
@pytest.mark.parametrize("name", ["segmented_lowrank_apply_", "segmented_lowrank_apply_emulated_"])
def test_disjoint_slices_of_one_buffer_are_accepted(name):
    """x and out carved from one preallocated buffer, not dense (ATen cannot analyse them), were
    refused as sharing a storage although no byte of one lies in the other's range."""
    g = torch.Generator().manual_seed(7)
    N, n, m, k = 8, 4, 5, 2
    f64 = dict(dtype=torch.float64)
    U, V = torch.randn(1, m, k, generator=g, **f64), torch.randn(1, n, k, generator=g, **f64)
    S, ranks, offs, slots = torch.ones(1, k, **f64), torch.tensor([k]), torch.tensor([0, N]), torch.tensor([0])
    op = getattr(torch.ops.tsv_fast, name)
    buf = torch.zeros(2 * N, 8, **f64)  # rows 0..N-1: x, rows N..: out, each in its first columns
    x, out = buf[:N, :n], buf[N:, :m]
    x.copy_(torch.randn(N, n, generator=g, **f64))
    op(out, x, offs, slots, U, S, V, ranks, 1.0)
    torch.testing.assert_close(out, x @ V[0] @ U[0].T)
    assert torch.equal(buf[:N, n:], torch.zeros(N, 8 - n, **f64))  # nothing written beside them
    assert torch.equal(buf[N:, m:], torch.zeros(N, 8 - m, **f64))
    with pytest.raises(ValueError, match="out must be x itself or share no memory with it"):  # column m - 1
        op(buf[:N, :m], buf[:N, m - 1:m - 1 + n], offs, slots, U, S, V, ranks, 1.0)


IMPL_IDS = {"segmented_lowrank_apply": "op", "segmented_lowrank_apply_": "op_",
            "segmented_lowrank_apply_emulated": "emulated", "segmented_lowrank_apply_emulated_": "emulated_"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", [1e39, -1e39, float("inf"), float("nan")])
def test_alpha_must_be_finite_within_float32_on_every_path(impl, alpha):
    """The CPU op raised RuntimeError for |alpha| > float32 max and the kernels returned Inf/NaN."""
    case = make_case("small")
    with pytest.raises(ValueError, match=r"alpha must be a finite number within the float32 range"):
        run(impl, *case, alpha)


@needs_ext
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_nonfinite_factors_give_the_same_nan_and_inf_on_every_path(alpha):
    """With alpha = 0 the CPU op used to return base (its GEMM skipped the product) and the
    kernels NaN (0 * Inf): now every path gives what the kernels compute."""
    x, base, offsets, Us, Ss, Vs = make_case("small")
    Us[0] = Us[0].clone()
    Us[0][1, 0] = float("inf")  # segment 0 (rows 0:4), column 1
    Vs[3] = Vs[3].clone()
    Vs[3][2, 0] = float("nan")  # segment 3 (rows 9:11)
    outs = {impl: run(impl, x, base, offsets, Us, Ss, Vs, alpha)
            for impl in [*IMPL_IDS, "fallback"]}
    want = outs["segmented_lowrank_apply_emulated"]  # the CUDA kernels' arithmetic
    assert not want[0:4, 1].isfinite().any() and want[9:11].isnan().all() and want[4:9].isfinite().all()
    for impl, out in outs.items():
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(out), kind(want)), (impl, kind.__name__)


@needs_ext
@pytest.mark.parametrize("op_name", list(IMPL_IDS))
def test_ops_refuse_inputs_that_require_grad(op_name):
    """The ops have no derivative: with grad mode on, autograd's fallback used to hand back outputs
    that required grad but got none (or, on the CPU only, a graph of the kernel's ATen calls)."""
    x, base, offsets, Us, Ss, Vs = make_case("small")
    offs, slots, U, S, V, ranks = packed_args(x, offsets, Us, Ss, Vs, (base.shape[1], x.shape[1]))
    op = getattr(torch.ops.tsv_fast, op_name)
    args = (base.clone(), x, offs, slots, U.requires_grad_(), S, V, ranks, 0.5)
    res = refuses_grad_inputs(op_name, args, "U")
    res = args[0] if res is None else res
    assert not res.requires_grad
    assert_close_to_ref(res, x, base, offsets, Us, Ss, Vs, 0.5)
    if op_name.endswith("_"):  # writing out in place bumps its version, so autograd sees stale saves
        out, w = base.clone(), torch.ones_like(base, requires_grad=True)
        y = (w * out).sum()
        op(out, *args[1:4], U.detach(), *args[5:])
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def test_pack_factors():
    Us = [torch.ones(4, 2), None, torch.ones(4, 3, dtype=torch.bfloat16)]
    Ss = [torch.ones(2), None, torch.ones(3, dtype=torch.bfloat16)]
    Vs = [torch.ones(5, 2), None, torch.ones(5, 3, dtype=torch.bfloat16)]
    U, S, V, ranks = ops.pack_factors(Us, Ss, Vs)
    assert U.shape == (3, 4, 3) and S.shape == (3, 3) and V.shape == (3, 5, 3) and U.dtype == torch.float32
    assert ranks.tolist() == [2, 0, 3] and ranks.dtype == torch.int64
    assert U[0, :, 2].abs().sum() == 0 and U[1].abs().sum() == 0 and S[0, 2] == 0
    U, S, V, ranks = ops.pack_factors([None], [None], [None], shape=(4, 5), device="meta")
    assert U.device.type == "meta"  # an all-None table still lands where the inputs are
    U, S, V, ranks = ops.pack_factors([None], [None], [None], shape=(4, 5))
    assert U.shape == (1, 4, 0) and V.shape == (1, 5, 0) and ranks.tolist() == [0]
    with pytest.raises(ValueError, match="pass shape"):
        ops.pack_factors([None], [None], [None])
    with pytest.raises(ValueError, match=r"slot 1: .* do not fit"):
        ops.pack_factors([torch.ones(4, 2), torch.ones(3, 2)], [torch.ones(2)] * 2, [torch.ones(5, 2)] * 2)


@pytest.mark.parametrize("which", ["U", "S", "V"])
def test_list_form_wants_all_three_factors_or_none(which):
    """A segment with U None but S, V given was silently left without its delta; S or V None
    failed with an AttributeError."""
    x, base, offsets, Us, Ss, Vs = make_case("small")
    factors = {"U": list(Us), "S": list(Ss), "V": list(Vs)}
    factors[which][3] = None
    with pytest.raises(TSVInputError, match=r"segmented_lowrank_apply: segment 3: U, S, V must be \(m, k\), "
                                            r"\(k,\), \(n, k\) or all None, got .*None"):
        segmented_lowrank_apply(x, offsets, factors["U"], factors["S"], factors["V"], out=base.clone())


def test_public_wrapper_autograd_and_default_out():
    x, base, offsets, Us, Ss, Vs = make_case("small", torch.float64, torch.float64)
    U, S, V, ranks = ops.pack_factors(Us, Ss, Vs)
    U.requires_grad_(True)
    out = ops.segmented_lowrank_apply_packed(x, offsets, U, S, V, ranks, alpha=2.0)  # falls back to PyTorch
    out.sum().backward()
    assert U.grad is not None and U.grad[2].abs().sum() == 0  # segment 2 has no delta
    ref, _ = reference(x, torch.zeros_like(base), offsets, Us, Ss, Vs, 2.0)
    torch.testing.assert_close(out.detach(), ref)


BAD_INPUTS = [
    ("offsets decreasing", {"offsets": [0, 5, 3, 9, 11]},
     r"offsets must be non-decreasing, but offsets\[2\] = 3 < offsets\[1\] = 5"),
    ("offsets past N", {"offsets": [0, 4, 4, 9, 12]}, r"offsets must lie within \[0, N = 11\]"),
    ("rank > kmax", {"ranks": [2, 3, 0, 4]}, r"ranks\[3\] = 4 must lie within \[0, kmax = 3\]"),
    ("bad slot", {"slots": [0, 1, 4, 3]}, r"slots\[2\] = 4 is not a factor slot"),
    ("slots length", {"slots": [0, 1]}, r"slots must be 1-D of length T \(offsets has T\+1 entries\) = 4"),
    ("U wrong m", {"U": torch.zeros(4, 6, 3)}, r"U\.size\(1\) must equal m \(columns of (base|out)\) = 5"),
    ("V wrong n", {"V": torch.zeros(4, 8, 3)}, r"V\.size\(1\) must equal n \(columns of x\) = 7"),
    ("S wrong kmax", {"S": torch.zeros(4, 2)}, r"S\.size\(1\) must equal kmax \(U\.size\(2\)\) = 3"),
    ("x 1-D", {"x": torch.zeros(11)}, r"x must be 2-D \(N, n\)"),
    ("base rows", {"base": torch.zeros(10, 5)}, r"(base|out)\.size\(0\) must equal N \(rows of x\) = 11"),
    ("x/base dtype", {"base": torch.zeros(11, 5, dtype=torch.float64)}, r"(base|out) has dtype .* but x has dtype"),
    ("factor dtypes", {"S": torch.zeros(4, 3, dtype=torch.float64)}, r"S has dtype .* but U has dtype"),
    ("int offsets dtype", {"offsets": torch.tensor([0, 4, 4, 9, 11], dtype=torch.int32)},
     r"offsets must have dtype int64"),
]


def _bad_args(over):
    x, base, offsets, Us, Ss, Vs = make_case("small")
    offs, slots, U, S, V, ranks = packed_args(x, offsets, Us, Ss, Vs, (5, 7))
    args = {"base": base, "x": x, "offsets": offs, "slots": slots, "U": U, "S": S, "V": V, "ranks": ranks}
    for k, v in over.items():
        args[k] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return [args[k] for k in ("base", "x", "offsets", "slots", "U", "S", "V", "ranks")]


@pytest.mark.parametrize("impl", [
    pytest.param("segmented_lowrank_apply", marks=needs_ext, id="op"),
    pytest.param("segmented_lowrank_apply_emulated", marks=needs_ext, id="emulated"),
    "fallback"])
@pytest.mark.parametrize("desc,over,msg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_value_error(impl, desc, over, msg):
    args = _bad_args(over)
    with pytest.raises(ValueError, match=msg):
        if impl == "fallback":
            ops._segmented_torch_(*args, 1.0)
        else:
            getattr(torch.ops.tsv_fast, impl)(*args, 1.0)


@needs_ext
@pytest.mark.parametrize("op_name", ["segmented_lowrank_apply", "segmented_lowrank_apply_",
                                     "segmented_lowrank_apply_emulated", "segmented_lowrank_apply_emulated_"])
@pytest.mark.parametrize("layout,x_dtype,factor_dtype", [
    ("small", torch.float32, torch.float32), ("odd", torch.bfloat16, torch.float32)])
def test_opcheck(op_name, layout, x_dtype, factor_dtype):
    x, base, offsets, Us, Ss, Vs = make_case(layout, x_dtype, factor_dtype)
    offs, slots, U, S, V, ranks = packed_args(x, offsets, Us, Ss, Vs, (base.shape[1], x.shape[1]))
    torch.library.opcheck(getattr(torch.ops.tsv_fast, op_name).default,
                          (base, x, offs, slots, U, S, V, ranks, 0.5))


@needs_ext
def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, _, offsets, Us, Ss, Vs = make_case("small", torch.float16)
    args = packed_args(x, offsets, Us, Ss, Vs, (5, 7))
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.tsv_fast.segmented_lowrank_apply(torch.empty(11, 5, dtype=torch.float16),
                                                         torch.empty(11, 7, dtype=torch.float16), *args, 1.0)
    assert out.shape == (11, 5) and out.dtype == torch.float16
    with FakeTensorMode(allow_non_fake_inputs=True):  # the fakes check alpha like the kernels
        with pytest.raises(ValueError, match="segmented_lowrank_apply_emulated: alpha must be a finite number"):
            torch.ops.tsv_fast.segmented_lowrank_apply_emulated(torch.empty(11, 5, dtype=torch.float16),
                                                                torch.empty(11, 7, dtype=torch.float16), *args, 1e39)


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

@needs_cuda
@needs_cuda_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("x_dtype,factor_dtype", DTYPES, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPES])
@pytest.mark.parametrize("index_on_gpu", [False, True])
def test_cuda_matches_cpu_op_and_reference(layout, x_dtype, factor_dtype, index_on_gpu):
    x, base, offsets, Us, Ss, Vs = make_case(layout, x_dtype, factor_dtype, device="cuda")
    offs, slots, U, S, V, ranks = packed_args(x, offsets, Us, Ss, Vs, (base.shape[1], x.shape[1]))
    if index_on_gpu:
        offs, slots, ranks = offs.cuda(), slots.cuda(), ranks.cuda()
    out = torch.ops.tsv_fast.segmented_lowrank_apply(base, x, offs, slots, U, S, V, ranks, ALPHA)
    assert_close_to_ref(out, x, base, offsets, Us, Ss, Vs, ALPHA)
    cpu = torch.ops.tsv_fast.segmented_lowrank_apply(
        *(t.cpu() for t in (base, x, offs, slots, U, S, V, ranks)), ALPHA)
    ref, scale = reference(x, base, offsets, Us, Ss, Vs, ALPHA)
    tol = 2e-5 * scale + 2 * torch.finfo(x_dtype).eps * ref.abs() + 1e-30
    assert bool(((out.cpu().double() - cpu.double()).abs() <= tol).all())
    public = ops.segmented_lowrank_apply_packed(x, offsets, U, S, V, ranks, out=base.clone(), alpha=ALPHA)
    assert_close_to_ref(public, x, base, offsets, Us, Ss, Vs, ALPHA)


@needs_cuda
@needs_cuda_ext
def test_cuda_large_and_opcheck():
    g = torch.Generator().manual_seed(5)
    N, n, m, T = 3200, 768, 3072, 8
    x = torch.randn(N, n, generator=g).cuda()
    Us = [torch.randn(m, 96, generator=g).cuda() / 30 for _ in range(T)]
    Ss = [torch.rand(96, generator=g).cuda() for _ in range(T)]
    Vs = [torch.randn(n, 96, generator=g).cuda() / 30 for _ in range(T)]
    offsets = [i * N // T for i in range(T + 1)]
    base = torch.randn(N, m, generator=g).cuda()
    offs, slots, U, S, V, ranks = packed_args(x, offsets, Us, Ss, Vs, (m, n))
    out = torch.ops.tsv_fast.segmented_lowrank_apply(base, x, offs, slots, U, S, V, ranks, ALPHA)
    assert_close_to_ref(out, x, base, offsets, Us, Ss, Vs, ALPHA)
    with pytest.raises(ValueError, match=r"is on cpu but x is on cuda"):
        torch.ops.tsv_fast.segmented_lowrank_apply(base, x, offs, slots, U.cpu(), S, V, ranks, ALPHA)
    xs, bs, offsets, Us, Ss, Vs = make_case("odd", device="cuda")
    args = packed_args(xs, offsets, Us, Ss, Vs, (bs.shape[1], xs.shape[1]))
    torch.library.opcheck(torch.ops.tsv_fast.segmented_lowrank_apply.default, (bs, xs, *args, 0.5))


@pytest.mark.parametrize("segments", [1, 2])
def test_mixed_factor_dtypes_accumulate_in_the_promoted_dtype(segments):
    """float64 anywhere means float64 products, with one segment as with several (one segment
    used to round mixed factors to float32)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g)
    U = [torch.randn(3, 2, dtype=torch.float64, generator=g) for _ in range(segments)]
    S = [torch.rand(2, generator=g) for _ in range(segments)]  # float32
    V = [torch.randn(4, 2, dtype=torch.float64, generator=g) for _ in range(segments)]
    offsets = [0, 6] if segments == 1 else [0, 3, 6]
    out = segmented_lowrank_apply(x, offsets, U, S, V)
    want = torch.cat([(x[a:b] @ V[i] * S[i].double()) @ U[i].T for i, (a, b) in enumerate(zip(offsets, offsets[1:]))])
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
