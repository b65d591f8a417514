"""The in-place segmented apply refuses an ``out`` that overlaps itself or its inputs on every path:
the compiled op (csrc/segmented.h) did, the PyTorch fallback (grad mode, no extension) did not, so
the same call succeeded or failed depending on which path ran."""

import pytest
import torch

from tsv_fast import ops

EXT_OK, EXT_WHY = ops.load_extension()
needs_ext = pytest.mark.skipif(not EXT_OK, reason=EXT_WHY)
N, n, m, k = 8, 4, 5, 2


def randn(*shape):
    """Seeded by the case's build (see build), so two builds of a case hold the same values."""
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


GEN = torch.Generator()


def args(out, x, U=None, S=None, V=None, offsets=(0, N), slots=(0,)):
    """(out, x, offsets, slots, U, S, V, ranks): the in-place op's arguments, one factor slot of rank k."""
    rows = out.shape[1]
    U = randn(1, rows, k) if U is None else U
    S = torch.ones(1, k, dtype=torch.float64) if S is None else S
    V = randn(1, n, k) if V is None else V
    return out, x, torch.tensor(offsets), torch.tensor(slots), U, S, V, torch.tensor([k])


def out_partly_over_x():
    store = randn(N + 4, n)
    return args(store[4:], store[:N])


def out_over_u():
    buf = randn(N * m)
    return args(buf.view(N, m), randn(N, n), U=buf[:m * k].view(1, m, k))


def out_over_s():
    buf = randn(N * m)
    return args(buf.view(N, m), randn(N, n), S=buf[-k:].view(1, k))


def out_over_offsets():
    buf = torch.zeros(N * m, dtype=torch.float64)
    out, x, offsets, *rest = args(buf.view(N, m), randn(N, n))
    buf.view(torch.int64)[:2] = offsets  # offsets kept in out's first elements
    return out, x, buf.view(torch.int64)[:2], *rest


def rows_overlap():  # row i starts at element i: not dense, ATen cannot tell
    return args(torch.zeros(N + m, dtype=torch.float64).as_strided((N, m), (1, 1)), randn(N, n))


def expanded():
    return args(torch.zeros(1, m, dtype=torch.float64).expand(N, m), randn(N, n))


def column_slice_over_u():
    wide = torch.zeros(N, 2 * m, dtype=torch.float64)
    return args(wide[:, :m], randn(N, n), U=wide.view(-1)[:m * k].view(1, m, k))


def column_slices_overlap():  # out's last column is x's first
    store = randn(N, m + n)
    return args(store[:, :m], store[:, m - 1:m - 1 + n])


REFUSED = {
    out_partly_over_x: "out must be x itself or share no memory with it",
    out_over_u: "out shares memory with U, which it reads",
    out_over_s: "out shares memory with S, which it reads",
    out_over_offsets: "out shares memory with offsets, which it reads",
    rows_overlap: r"out has elements that share memory .*got strides \[1, 1\] for shape \[8, 5\]",
    expanded: r"out has elements that share memory .*got strides \[0, 1\] for shape \[8, 5\]",
    column_slice_over_u: "out shares memory with U, which it reads",
    column_slices_overlap: "out must be x itself or share no memory with it",
}


def out_is_x():
    x = randn(N, n)
    return args(x, x, offsets=(0, 4, 8), slots=(0, 0))


def disjoint_column_slices():  # x and out from one buffer, not dense, in disjoint bytes
    buf = torch.zeros(2 * N, 8, dtype=torch.float64)
    buf[:N, :n] = randn(N, n)
    return args(buf[N:, :m], buf[:N, :n])


def disjoint_dense_slices():
    flat = randn(N * n + N * m)
    return args(flat[N * n:].view(N, m), flat[:N * n].view(N, n))


def column_slice():  # not dense, but its elements are distinct and its storage its own
    return args(torch.zeros(N, 2 * m, dtype=torch.float64)[:, :m], randn(N, n))


ACCEPTED = [out_is_x, disjoint_column_slices, disjoint_dense_slices, column_slice]


def build(case):
    GEN.manual_seed(0)
    return case()


def fallback(*a):
    return ops._segmented_torch_(*a, 1.0)


def public_wrapper_in_grad_mode(out, x, offsets, slots, U, S, V, ranks):
    """What a user reaches: a factor that requires grad sends the call to the PyTorch path (V: no
    case lets out overlap it)."""
    return ops.segmented_lowrank_apply_packed(x, offsets, U, S, V.clone().requires_grad_(), ranks, out=out,
                                              slots=slots)


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("path", [fallback, public_wrapper_in_grad_mode], ids=["fallback", "public-grad"])
def test_pytorch_path_refuses_overlapping_out(case, path):
    a = build(case)
    before = a[0].clone()
    with pytest.raises(ValueError, match=rf"^segmented_lowrank_apply: {REFUSED[case]}"):
        path(*a)
    assert torch.equal(a[0], before)  # nothing written


@needs_ext
@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.__name__)
def test_every_path_gives_the_same_refusal(case):
    errors = []
    for run in (torch.ops.tsv_fast.segmented_lowrank_apply_, torch.ops.tsv_fast.segmented_lowrank_apply_emulated_,
                ops._segmented_torch_):
        with pytest.raises(ValueError) as info:
            run(*build(case), 1.0)
        errors.append(str(info.value).replace("segmented_lowrank_apply_emulated", "segmented_lowrank_apply"))
    assert errors[0] == errors[1] == errors[2]


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.__name__)
def test_pytorch_path_accepts_what_the_op_accepts(case):
    out, x, offsets, slots, U, S, V, ranks = a = build(case)
    want = out.clone()
    xs = x.clone()  # out may be x: every row reads its own x before it is written
    for s, p in enumerate(slots.tolist()):
        lo, hi = offsets[s], offsets[s + 1]
        want[lo:hi] += xs[lo:hi] @ V[p] * S[p] @ U[p].T
    fallback(*a)
    torch.testing.assert_close(out, want)
    if EXT_OK:
        b = build(case)
        torch.ops.tsv_fast.segmented_lowrank_apply_(*b, 1.0)
        torch.testing.assert_close(b[0], want)
