"""Serve many compressed tasks over one base model: ``MultiTaskModel``.

Only the base weights and each task's TSV-C factors stay in memory. A forward pass
reads every weight through a :class:`_Weights` view that knows which task each row
of the batch belongs to:

* one task (``select`` or a batch of one task): each matrix is either rebuilt on the
  fly, ``W0 + U diag(S) Vᵀ``, used and dropped (one full matrix alive at a time), or
  never formed: ``x W0ᵀ + ((x V) ⊙ S) Uᵀ``. Which is faster depends on the batch size
  and the ranks; it is timed on the model's own block shapes, not guessed.
* a mixed batch: rows are grouped by task, one base GEMM runs over the whole batch
  and each task segment adds its low-rank term (:mod:`tsv_fast.runtime_ops`); the
  non-matrix deltas (biases, LayerNorm, ``conv1``, ``class_embedding``) are applied
  per segment.

The architecture-specific part is an *adapter* that runs the model's forward through
a ``_Weights`` view (:class:`OpenCLIPVisionAdapter` for open_clip's CLIP ViT image
tower). An adapter has ``prefix`` (its keys' prefix in the state dict), ``device``,
``forward(w, inputs)``, ``block(w, i, x)`` and ``calibration_block(batch)``; a new
architecture needs a new adapter, nothing else.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .errors import TSVInputError
from .keys import is_matrix_key, resolve_rank
from .runtime_ops import group_rows, segmented_lowrank_apply
from .store import TaskStore
from .tasks import CompressedTask, StateDict, as_sources, nonfinite
from .tsv import task_factors, tsv_merge_factors
from .writer import staged_output

__all__ = ["MultiTaskModel", "OpenCLIPVisionAdapter", "merge_compressed", "STRATEGIES"]

STRATEGIES = ("lowrank", "materialise")
Segment = tuple[CompressedTask | None, int, int]  # task (None = base), first row, end row


# --------------------------------------------------------------------------------------------
# TSV-M from stored factors, kept factored


def merge_compressed(base: StateDict, tasks: Sequence[CompressedTask], alpha: float = 1.0,
                     name: str = "merged") -> CompressedTask:
    """TSV-M of compressed tasks, returned as a :class:`CompressedTask` in SVD form.

    The same per-key computation as ``merge_layers(base, tasks, "tsv", alpha)`` (stored
    factors truncated to floor(r/T) for T = ``len(tasks)``, or what is stored when less;
    whitened concatenation; mean of the non-matrix deltas), but the result is left
    factored so the runtime serves it like any other task. Its rank is at most the sum of
    the tasks' ranks (≤ r), so it costs ``(m+n)·rank`` per key rather than ``m·n``.

    Each key's ``U⊥ diag(S) V⊥ᵀ`` is rewritten as a true SVD (:func:`svd_form`): stored
    factors above a merge's k are truncated to their k largest triplets, the best rank-k
    part only when U and V are orthonormal, so a merge that is merged again (or stored)
    must be an SVD, like any TSV-C task.
    """
    sources = as_sources(base, list(tasks))
    T = len(sources)
    out = CompressedTask(name)
    if alpha == 0:  # every singular value and delta is zero: dropped, as zero deltas are (the base)
        return out
    for key, b in base.items():
        if not b.is_floating_point():
            continue
        if is_matrix_key(key, b):
            if not any(t.factors.get(key) is not None or key in t.deltas for t in tasks):
                continue  # zero delta in every task (a dense delta is factorised by task_factors)
            k = resolve_rank(b.shape, None, T)
            if k == 0:
                continue  # merge_layers keeps the base here too (with a TSVRankWarning)
            U, S, V = svd_form(*tsv_merge_factors(task_factors(sources, key, b, k)))
            if S.numel() == 0:
                continue  # a zero Δ: nothing to store, as for a key no task touches
            out.factors[key] = (U if alpha >= 0 else -U, S * abs(alpha), V)  # S ≥ 0, as in an SVD
        else:
            present = [t.deltas[key] for t in tasks if key in t.deltas]
            if present:
                total = sum(d.to(torch.float64 if b.dtype == torch.float64 else torch.float32) for d in present)
                out.deltas[key] = total * (alpha / T)
    return out


def svd_form(U: Tensor, S: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U diag(S) Vᵀ`` as an SVD: orthonormal U and V, S descending (float64 inside, returned
    in the factors' dtypes). TSV-M's ``(U⊥, S, V⊥)`` is not one: S is the unsorted concatenation
    of the tasks' values, and U⊥ is not orthonormal where the whitening's cut zeroed directions.

    QR of both sides, then the SVD of the small ``R_u diag(S) R_vᵀ`` (c×c). Singular values
    that are zero to float64 rounding (the zero columns TSV-M gives a task without a delta
    on the key) are dropped with their vectors, which would be an arbitrary completion:
    the rank can be below c (0 when Δ is zero)."""
    Qu, Ru = torch.linalg.qr(U.double())
    Qv, Rv = torch.linalg.qr(V.double())
    P, s, Qh = torch.linalg.svd((Ru * S.double()) @ Rv.T)
    k = int((s > s[:1] * max(len(s), 1) * torch.finfo(torch.float64).eps).sum())
    return ((Qu @ P[:, :k]).to(U.dtype).contiguous(), s[:k].to(S.dtype).contiguous(),
            (Qv @ Qh[:k].T).to(V.dtype).contiguous())


# --------------------------------------------------------------------------------------------
# The weights of one forward pass


class _Weights:
    """Every weight a forward pass reads, for a batch whose rows are grouped into task segments.

    ``base`` maps state-dict keys to the base tensors; ``segments`` cover the batch rows
    in order; ``strategy`` picks how a single-segment batch uses the factors; ``packed``,
    when given, maps ``(key, transposed)`` to a packed factor table
    ``(slot of each task name, U, S, V, ranks)`` used by mixed batches.
    """

    def __init__(self, base: Mapping[str, Tensor], segments: Sequence[Segment], strategy: str = "lowrank",
                 packed=None):
        self.base, self.segments, self.strategy, self.packed = base, list(segments), strategy, packed
        self.single = len(self.segments) == 1
        self.touched: set[str] = set()

    def _base(self, key: str) -> Tensor:
        self.touched.add(key)
        return self.base[key]

    @staticmethod
    def _factors(task: CompressedTask | None, key: str):
        return None if task is None else task.factors.get(key)

    @staticmethod
    def _dense_delta(task: CompressedTask | None, key: str, like: Tensor) -> Tensor | None:
        """A key's delta as a dense tensor (only for small or non-matrix keys)."""
        if task is None:
            return None
        if key in task.factors:
            U, S, V = (t.to(like.dtype) for t in task.factors[key])
            return (U * S) @ V.T
        d = task.deltas.get(key)
        return None if d is None else d.to(like.dtype)

    def param(self, key: str, task: CompressedTask | None) -> Tensor:
        """``θ0 + δ`` of one task for a small key (bias, LayerNorm, embedding...)."""
        b = self._base(key)
        d = self._dense_delta(task, key, b)
        return b if d is None else b + d

    # -- matrices ---------------------------------------------------------------------------
    def linear(self, x: Tensor, wkey: str, bkey: str | None = None) -> Tensor:
        """``x Wᵀ + b`` (``nn.Linear``) with each row's task weights; x is (B, ..., n)."""
        return self._matmul(x, wkey, bkey, transposed=True)

    def matmul(self, x: Tensor, key: str) -> Tensor:
        """``x W`` for a weight used on the right (open_clip's ``visual.proj``)."""
        return self._matmul(x, key, None, transposed=False)

    def _matmul(self, x: Tensor, wkey: str, bkey: str | None, transposed: bool) -> Tensor:
        W0 = self._base(wkey)
        b0 = self._base(bkey) if bkey is not None else None
        mm = (lambda x_, W, b: F.linear(x_, W, b)) if transposed else \
             (lambda x_, W, b: x_ @ W if b is None else torch.addmm(b, x_, W))
        if self.single:
            task = self.segments[0][0]
            f = self._factors(task, wkey)
            b = self.param(bkey, task) if bkey is not None else None
            if f is not None and self.strategy == "materialise":
                return mm(x, ops.reconstruct(W0, *f, 1.0), b)  # the one full matrix alive
            y = mm(x, W0, b)
            if f is not None:
                self._lowrank(x, y, [f], [0, x.shape[0]], transposed)
            return y
        y = mm(x, W0, b0)
        offsets = [s for _, s, _ in self.segments] + [self.segments[-1][2]]
        factors = [self._factors(t, wkey) for t, _, _ in self.segments]
        if self.packed is not None and any(f is not None for f in factors):
            slot_of, U, S, V, ranks = self.packed(wkey, transposed)
            slots = [-1 if t is None else slot_of.get(t.name, -1) for t, _, _ in self.segments]
            self._lowrank_packed(x, y, offsets, slots, (U, S, V, ranks))
            # tasks outside the table (another rank, e.g. a merge): the per-segment loop
            rest = [f if slot < 0 else None for f, slot in zip(factors, slots)]
            if any(f is not None for f in rest):
                self._lowrank(x, y, rest, offsets, transposed)
        elif self.packed is None:
            self._lowrank(x, y, factors, offsets, transposed)
        if bkey is not None:
            for task, s, e in self.segments:
                db = self._dense_delta(task, bkey, b0)
                if db is not None:
                    y[s:e] += db
        return y

    @staticmethod
    def _lowrank(x: Tensor, y: Tensor, factors, row_offsets: list[int], transposed: bool) -> None:
        rows = x.shape[0]
        per_row = x[0].numel() // x.shape[-1] if rows else 1  # tokens per row
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        offsets = [o * per_row for o in row_offsets]
        Us, Ss, Vs = [], [], []
        for f in factors:
            if f is None:
                Us.append(None), Ss.append(None), Vs.append(None)
            else:
                U, S, V = f
                # W = U S Vᵀ used as x Wᵀ → ((x V) S) Uᵀ; used as x W → ((x U) S) Vᵀ
                Us.append(U if transposed else V), Ss.append(S), Vs.append(V if transposed else U)
        segmented_lowrank_apply(x2, offsets, Us, Ss, Vs, out=y2)

    @staticmethod
    def _lowrank_packed(x: Tensor, y: Tensor, row_offsets: list[int], slots: list[int], table) -> None:
        """All segments' low-rank terms in one op call (``ops.segmented_lowrank_apply_packed``)."""
        per_row = x[0].numel() // x.shape[-1] if x.shape[0] else 1  # tokens per row
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        ops.segmented_lowrank_apply_packed(x2, [o * per_row for o in row_offsets], *table, out=y2, slots=slots)

    # -- per-row parameters -----------------------------------------------------------------
    def layer_norm(self, x: Tensor, prefix: str, module: nn.LayerNorm) -> Tensor:
        """open_clip's LayerNorm (or LayerNormFp32) with each row's task weight and bias."""
        from open_clip.transformer import LayerNormFp32

        xin = x.float() if isinstance(module, LayerNormFp32) else x
        shape = module.normalized_shape
        wkey, bkey = prefix + "weight", prefix + "bias"
        if self.single:
            task = self.segments[0][0]
            return F.layer_norm(xin, shape, self.param(wkey, task).to(xin.dtype),
                                self.param(bkey, task).to(xin.dtype), module.eps).to(x.dtype)
        y = F.layer_norm(xin, shape, None, None, module.eps)
        out = torch.empty_like(y)
        for task, s, e in self.segments:
            torch.addcmul(self.param(bkey, task).to(y.dtype), y[s:e], self.param(wkey, task).to(y.dtype),
                          out=out[s:e])
        return out.to(x.dtype)

    def add(self, x: Tensor, key: str) -> Tensor:
        """``x + P`` for an additive parameter (positional embedding), per row's task."""
        if self.single:
            return x + self.param(key, self.segments[0][0]).to(x.dtype)
        out = torch.empty_like(x)
        for task, s, e in self.segments:
            torch.add(x[s:e], self.param(key, task).to(x.dtype), out=out[s:e])
        return out

    def mul(self, x: Tensor, key: str) -> Tensor:
        """``x ⊙ γ`` (LayerScale), per row's task."""
        if self.single:
            return x * self.param(key, self.segments[0][0]).to(x.dtype)
        out = torch.empty_like(x)
        for task, s, e in self.segments:
            torch.mul(x[s:e], self.param(key, task).to(x.dtype), out=out[s:e])
        return out

    def rows(self, key: str, batch: int) -> Tensor:
        """A parameter repeated per row, with each row's task value: (B, *shape)."""
        parts = [self.param(key, task).expand(e - s, *self.base[key].shape) for task, s, e in self.segments]
        return parts[0] if self.single else torch.cat(parts)

    def conv2d(self, x: Tensor, wkey: str, module: nn.Conv2d, bkey: str | None = None) -> Tensor:
        """A convolution with each segment's own kernel (θ0 + δ, rebuilt per segment)."""
        def conv(x_, task):
            return F.conv2d(x_, self.param(wkey, task), self.param(bkey, task) if bkey else None,
                            module.stride, module.padding, module.dilation, module.groups)

        if self.single:
            return conv(x, self.segments[0][0])
        return torch.cat([conv(x[s:e], task) for task, s, e in self.segments])


# --------------------------------------------------------------------------------------------
# open_clip CLIP ViT image tower


class OpenCLIPVisionAdapter:
    """Runs open_clip's ``VisionTransformer.forward`` (default residual blocks) through a
    :class:`_Weights` view, op for op, so that outputs match ``encode_image`` of the
    model with the task's weights loaded. Unsupported variants are refused up front."""

    def __init__(self, model: nn.Module):
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if isinstance(model, VisionTransformer):
            self.visual, self.prefix = model, ""
        elif isinstance(getattr(model, "visual", None), VisionTransformer):
            self.visual, self.prefix = model.visual, "visual."
        else:
            raise TSVInputError(f"MultiTaskModel: no adapter for {type(model).__name__}: expected an open_clip CLIP "
                                f"model with a VisionTransformer image tower (model.visual)")
        v = self.visual
        problems = []
        if v.attn_pool is not None:
            problems.append("attentional pooling")
        if not isinstance(v.patch_dropout, nn.Identity):
            problems.append("patch dropout")
        if getattr(v, "pool_type", "tok") not in ("tok", "avg"):
            problems.append(f"pool_type={v.pool_type!r}")
        for i, blk in enumerate(v.transformer.resblocks):
            if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
                problems.append(f"block {i} is a {type(blk).__name__}")
                break
            a = blk.attn
            if not a._qkv_same_embed_dim or a.bias_k is not None or a.add_zero_attn or a.in_proj_bias is None:
                problems.append(f"block {i}: attention without a fused in_proj / with bias_kv or zero_attn")
                break
        if problems:
            raise TSVInputError(f"MultiTaskModel: this open_clip VisionTransformer uses {', '.join(problems)}, "
                                f"which the CLIP ViT adapter does not implement")
        self.tokens, self.width = v.positional_embedding.shape

    # -- what MultiTaskModel needs from any adapter ------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def calibration_block(self, batch: int) -> tuple[int, str, Tensor]:
        """A representative block (the middle one), its key prefix and an input for it."""
        i = len(self.visual.transformer.resblocks) // 2
        w = self.visual.conv1.weight
        gen = torch.Generator(device=w.device).manual_seed(0)  # the user's global RNG is left alone
        x = torch.randn(batch, self.tokens, self.width, dtype=w.dtype, device=w.device, generator=gen)
        return i, f"{self.prefix}transformer.resblocks.{i}.", x

    def block(self, w: _Weights, i: int, x: Tensor) -> Tensor:
        """One ``ResidualAttentionBlock.forward`` (no attention mask: the image tower has none)."""
        blk = self.visual.transformer.resblocks[i]
        p = f"{self.prefix}transformer.resblocks.{i}."
        B, L, d = x.shape
        h = w.layer_norm(x, p + "ln_1.", blk.ln_1)
        qkv = w.linear(h, p + "attn.in_proj_weight", p + "attn.in_proj_bias")
        heads = blk.attn.num_heads
        q, k, v = (t.reshape(B, L, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, d)
        a = w.linear(o, p + "attn.out_proj.weight", p + "attn.out_proj.bias")
        if not isinstance(blk.ls_1, nn.Identity):
            a = w.mul(a, p + "ls_1.gamma")
        x = x + a
        h = w.layer_norm(x, p + "ln_2.", blk.ln_2)
        h = w.linear(h, p + "mlp.c_fc.weight", p + "mlp.c_fc.bias")
        h = blk.mlp.gelu(h)
        h = w.linear(h, p + "mlp.c_proj.weight", p + "mlp.c_proj.bias")
        if not isinstance(blk.ls_2, nn.Identity):
            h = w.mul(h, p + "ls_2.gamma")
        return x + h

    def forward(self, w: _Weights, images: Tensor):
        v, p = self.visual, self.prefix
        B = images.shape[0]
        x = w.conv2d(images, p + "conv1.weight", v.conv1)
        x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)
        cls = w.rows(p + "class_embedding", B).to(x.dtype).unsqueeze(1)
        x = torch.cat([cls.expand(B, 1, x.shape[-1]), x], dim=1)
        x = w.add(x, p + "positional_embedding")
        if not isinstance(v.ln_pre, nn.Identity):
            x = w.layer_norm(x, p + "ln_pre.", v.ln_pre)
        for i in range(len(v.transformer.resblocks)):
            x = self.block(w, i, x)
        if v.final_ln_after_pool:
            pooled, tokens = _pool(v, x)
            pooled = w.layer_norm(pooled, p + "ln_post.", v.ln_post)
        else:
            x = w.layer_norm(x, p + "ln_post.", v.ln_post)
            pooled, tokens = _pool(v, x)
        if v.proj is not None:
            pooled = w.matmul(pooled.contiguous(), p + "proj")
        return (pooled, tokens) if v.output_tokens else pooled


def _pool(v, x: Tensor) -> tuple[Tensor, Tensor]:
    if v.pool_type == "avg":
        return x[:, 1:].mean(dim=1), x[:, 1:]
    return x[:, 0], x[:, 1:]


# --------------------------------------------------------------------------------------------
# The runtime


class MultiTaskModel(nn.Module):
    """One base model, many tasks as low-rank factors, any task or merge at request time.

    Args:
        model: an open_clip CLIP model (or its ``VisionTransformer``) holding the base
            weights; it is used in eval mode and never modified.
        store: a :class:`~tsv_fast.TaskStore` built on this model's weights (checked by
            fingerprint), or ``CompressedTask`` s (a sequence or a name → task mapping).
        strategy: ``"auto"`` (timed per task rank profile and batch size), ``"lowrank"``
            or ``"materialise"``: how a single-task batch uses the factors.
        calibration_batches: batch sizes timed by ``"auto"``.
        adapter: runs the model's forward through the task weights (default: the open_clip
            CLIP ViT image tower adapter); see the module docstring.

    ``model(images)`` runs the selected task (the base when none); ``model(images,
    task_ids=[...])`` runs one task per row in one pass. Both return what
    ``encode_image`` returns.
    """

    def __init__(self, model: nn.Module, store: TaskStore | Sequence[CompressedTask] | Mapping[str, CompressedTask],
                 *, strategy: str = "auto", calibration_batches: Sequence[int] = (1, 8, 64), adapter=None):
        super().__init__()
        self.model = model.eval()
        self.adapter = adapter if adapter is not None else OpenCLIPVisionAdapter(model)
        self._base = dict(model.state_dict())  # the model's own tensors, not copies
        device = self.adapter.device
        self._tasks: dict[str, CompressedTask] = {}
        self._packed: dict[tuple[str, bool], tuple] = {}  # mixed-batch factor tables, see _packed_factors
        if isinstance(store, TaskStore):
            self._check_store_base(store)
            loaded = [store.load(n, device) for n in store.names()]
        elif isinstance(store, Mapping):
            loaded = [CompressedTask(n, t.factors, t.deltas) for n, t in store.items()]
        else:
            loaded = list(store)
        for task in loaded:
            self._add_task(task.name, task, device)
        self.strategy = strategy
        self.calibration: dict[tuple, dict[int, dict[str, float]]] = {}
        self.calibration_batches = calibration_batches
        self.last_strategy: str | None = None
        self._selected: str | None = None
        self._merges: dict[tuple, str] = {}
        self._checked_keys = False

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.double()``, ``.cuda()``... convert the model, and here also the base
        tensors (``_base`` holds the old ones), every task's factors and deltas, dropping the
        packed tables and the timings (both depend on dtype and device). Tasks whose factors or
        deltas overflow the new dtype (``.half()`` of a singular value above 65504) are refused
        before anything is converted: they would give NaN outputs."""
        tasks = {name: _converted(task, fn) for name, task in self._tasks.items()}
        flat = [(name, key, t) for name, task in tasks.items() for key, t in task.to_state_dict().items()]
        if bad := nonfinite([t for _, _, t in flat]):
            name, key, t = flat[bad[0]]
            dtype = str(t.dtype).removeprefix("torch.")
            raise TSVInputError(f"task {name!r}: key {key!r} overflows {dtype} (Inf after the conversion); the "
                                f"model is left unconverted: keep it in a wider dtype (float32, or bfloat16 "
                                f"instead of float16)")
        super()._apply(fn, recurse)
        self._base = dict(self.model.state_dict())
        self._tasks = tasks
        self._packed.clear()
        self.calibration.clear()
        return self

    def __getstate__(self) -> dict:
        """``copy.deepcopy`` and pickling leave out ``_base``: it holds the model's own tensors,
        which a copy would duplicate (parameters are cloned, not shared); rebuilt on load."""
        return {**super().__getstate__(), "_base": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._base = dict(self.model.state_dict())

    # -- tasks ------------------------------------------------------------------------------
    def _check_store_base(self, store: TaskStore) -> None:
        keys = store.manifest.get("base", {}).get("keys")
        if keys is None or store.fingerprint is None:
            return
        missing = [k for k in keys if k not in self._base]
        if missing:
            raise TSVInputError(f"task store {store.path}: {len(missing)} base key(s) are not in the model, "
                                f"e.g. {missing[:3]}")
        store.check_base({k: self._base[k] for k in keys}, "this model's weights")

    def _add_task(self, name: str, task: CompressedTask, device) -> None:
        if name in self._tasks:
            raise TSVInputError(f"two tasks named {name!r}")
        as_sources(self._base, [task], [name])  # keys, shapes, finiteness against the model
        # The forward reads a matrix key's delta only from its factors: a dense one would be ignored.
        dense = [k for k in task.deltas if k.startswith(self.adapter.prefix) and is_matrix_key(k, self._base[k])]
        if dense:
            raise TSVInputError(f"task {name!r}: matrix key(s) {dense[:3]} hold a dense delta; MultiTaskModel "
                                f"serves matrix keys only as U, S, V factors (compress the task)")
        self._packed.clear()  # the tables cover every task: rebuilt on next use
        self._tasks[name] = _converted(task, lambda t: t.to(device), name)

    def _packed_factors(self, key: str, transposed: bool) -> tuple:
        """``(slot of each task name, U, S, V, ranks)``: the factors of ``key`` of every task
        of the most common rank and dtype, packed once (on first use by a mixed batch) for the
        segmented op; the tasks' own factors then become views into the table, so it costs
        no extra memory. Dropped (and rebuilt on next use) when a task is added.
        ``transposed=False`` (a weight used as ``x W``) swaps the roles of U and V."""
        entry = self._packed.get((key, transposed))
        if entry is None:
            with_key = {n: t.factors[key] for n, t in self._tasks.items() if t.factors.get(key) is not None}
            # Only the tasks of the most common (rank, dtype) share the table: padding every task
            # to a merge's rank Σk would multiply the memory, and a table of another dtype cannot
            # hold a task's factors as views (it would be a second copy). Tasks whose U, S, V
            # differ in dtype never share it. The others take the per-segment loop.
            profile = {n: (f[1].shape[0], f[1].dtype) for n, f in with_key.items()
                       if f[0].dtype == f[1].dtype == f[2].dtype}
            counts = Counter(profile.values())
            common = min(counts, key=lambda p: (-counts[p], p[0], str(p[1]))) if counts else None
            names = [n for n, p in profile.items() if p == common]
            for n, f in with_key.items():  # views into a dropped table must not keep it alive
                if n not in names:
                    self._tasks[n].factors[key] = tuple(_compact(t) for t in f)
            fs = [with_key[n] for n in names]
            W0 = self._base[key]
            out_dim, in_dim = (W0.shape[0], W0.shape[1]) if transposed else (W0.shape[1], W0.shape[0])
            U = [f[0] if transposed else f[2] for f in fs]
            V = [f[2] if transposed else f[0] for f in fs]
            table = ops.pack_factors(U, [f[1] for f in fs], V, shape=(out_dim, in_dim), device=W0.device)
            entry = ({n: i for i, n in enumerate(names)}, *table)
            self._packed[(key, transposed)] = entry
            Ut, St, Vt, _ = table
            # The table becomes the only copy: each task's factors are views into it.
            for i, n in enumerate(names):
                view = (Ut[i], St[i], Vt[i]) if transposed else (Vt[i], St[i], Ut[i])
                self._tasks[n].factors[key] = view
        return entry

    def _named(self, name: str, what: str) -> CompressedTask:
        """``self.task(name)`` for calls that need a task, not the base (None)."""
        if name is None:
            raise TSVInputError(f"{what} needs a task id, got None (the base has no delta)")
        return self.task(name)

    def names(self) -> list[str]:
        """Task ids this model serves: the stored tasks, then the merges made so far."""
        return list(self._tasks)

    def task(self, name: str | None) -> CompressedTask | None:
        if name is None:
            return None
        try:
            return self._tasks[name]
        except KeyError:
            raise TSVInputError(f"unknown task {name!r}; this model serves {self.names()}") from None

    def nbytes(self) -> int:
        """Bytes of all resident factors and deltas (on top of the base model)."""
        return sum(t.nbytes() for t in self._tasks.values())

    def select(self, name: str | None) -> MultiTaskModel:
        """Forward passes without ``task_ids`` now use ``name`` (None: the base). O(1): the
        task's weights are rebuilt or applied during each forward, never cached."""
        self.task(name)
        self._selected = name
        return self

    @property
    def selected(self) -> str | None:
        return self._selected

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value != "auto" and value not in STRATEGIES:
            raise TSVInputError(f"strategy must be 'auto' or one of {STRATEGIES}, got {value!r}")
        self._strategy = value

    @property
    def calibration_batches(self) -> tuple[int, ...]:
        return self._calibration_batches

    @calibration_batches.setter
    def calibration_batches(self, value: Sequence[int]) -> None:
        # checked here: a bad size would otherwise fail only in the first "auto" forward
        value = tuple(value)
        if not value or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0 for b in value):
            raise TSVInputError(f"calibration_batches must be positive integers, got {value!r}")
        self._calibration_batches = value
        self.calibration = {}  # timings of other sizes would pick strategies for these

    def merge(self, names: Sequence[str], alpha: float = 1.0, *, name: str | None = None) -> str:
        """TSV-M of stored tasks (or merges) from their factors; returns the id to ``select``
        or put in ``task_ids``: ``name``, or by default ``tsv-m(a+b)@alpha`` (alpha's full
        repr, so that distinct alphas never share an id; names other than letters, digits and
        ``._-`` in quotes). Cached by ``(names, alpha, name)``."""
        if isinstance(names, str) or len(names) == 0 or not all(isinstance(n, str) for n in names):
            raise TSVInputError(f"merge needs a non-empty list of task names, got {names!r}")
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise TSVInputError(f"merge: task(s) {twice} named more than once in {list(names)}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise TSVInputError(f"merge: alpha must be a finite number, got {alpha!r}")
        if name is not None and not (isinstance(name, str) and name):
            raise TSVInputError(f"merge: name must be a non-empty string (the merge's id), got {name!r}")
        alpha = float(alpha)
        cache_key = (tuple(names), alpha, name)
        if cache_key in self._merges:
            return self._merges[cache_key]
        tasks = [self.task(n) for n in names]
        # a name with '+' (valid in a store), parentheses or quotes is quoted: ["a+b", "c"] and
        # ["a", "b+c"] must not share an id
        parts = (n if re.fullmatch(r"[A-Za-z0-9._-]+", n) else repr(n) for n in names)
        merged_id = name or ("tsv-m(" + "+".join(parts) + ")" + ("" if alpha == 1.0 else f"@{alpha!r}"))
        merged = merge_compressed(self._base, tasks, alpha, merged_id)
        self._add_task(merged_id, merged, self.adapter.device)
        self._merges[cache_key] = merged_id
        return merged_id

    # -- forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: Tensor, task_ids: Sequence[str | None] | None = None, normalize: bool = False):
        B = images.shape[0]
        if B == 0:
            raise TSVInputError("MultiTaskModel: empty batch (no images)")
        order = None
        if task_ids is None:
            segments = [(self.task(self._selected), 0, B)]
        else:
            if len(task_ids) != B:
                raise TSVInputError(f"task_ids has {len(task_ids)} entries for a batch of {B} images")
            order, offsets, ids = group_rows(list(task_ids))
            segments = [(self.task(t), offsets[i], offsets[i + 1]) for i, t in enumerate(ids)]
            if len(segments) == 1:
                order = None
            else:
                images = images[order.to(images.device)]
        strategy = self._choose(segments[0][0], B) if len(segments) == 1 else "lowrank"
        self.last_strategy = strategy
        w = _Weights(self._base, segments, strategy, packed=self._packed_factors if len(segments) > 1 else None)
        out = self.adapter.forward(w, images)
        self._check_keys(w)
        if order is not None:
            inverse = torch.argsort(order).to(images.device)
            out = tuple(o[inverse] for o in out) if isinstance(out, tuple) else out[inverse]
        if normalize:
            out = (F.normalize(out[0], dim=-1), out[1]) if isinstance(out, tuple) else F.normalize(out, dim=-1)
        return out

    def _check_keys(self, w: _Weights) -> None:
        """A task key of the image tower that the adapter never read would be silently ignored."""
        if self._checked_keys or not w.touched:
            return
        prefix = self.adapter.prefix
        for task in self._tasks.values():
            unused = [k for k in (*task.factors, *task.deltas) if k.startswith(prefix) and k not in w.touched]
            if unused:
                raise TSVInputError(f"task {task.name!r}: key(s) {unused[:3]} of the image tower are not used by "
                                    f"the {type(self.adapter).__name__}: its forward would ignore them")
        self._checked_keys = True

    # -- strategy ---------------------------------------------------------------------------
    def _choose(self, task: CompressedTask | None, batch: int) -> str:
        if task is None or not task.factors:
            return "lowrank"  # nothing to rebuild
        if self._strategy != "auto":
            return self._strategy
        table = self._calibrate(task)
        nearest = min(table, key=lambda b: abs(math.log(b) - math.log(max(batch, 1))))
        times = table[nearest]
        return min(times, key=times.get)

    def _calibrate(self, task: CompressedTask) -> dict[int, dict[str, float]]:
        """Time one transformer block both ways at each calibration batch size, with this
        task's ranks (tasks with the same rank profile share the result). Runs under a forked
        RNG: a custom adapter's ``calibration_block`` (or block) may draw from the global RNG,
        and timing must not change what the user's next ``torch.randn`` returns."""
        with _forked_rng(self.adapter.device):
            i, p, _ = self.adapter.calibration_block(1)
            signature = tuple(sorted((k.removeprefix(p), task.rank(k), str(task.factors[k][0].dtype))
                                     for k in task.factors if k.startswith(p)))
            if signature in self.calibration:
                return self.calibration[signature]
            table = {}
            with torch.no_grad():
                for b in self.calibration_batches:
                    _, _, x = self.adapter.calibration_block(b)
                    table[b] = {s: _best_time(lambda: self.adapter.block(_Weights(self._base, [(task, 0, b)], s), i,
                                                                         x), x.device) for s in STRATEGIES}
        self.calibration[signature] = table
        return table

    def crossover(self, name: str) -> int | None:
        """Smallest calibrated batch size at which rebuilding the matrices beats the
        low-rank apply for ``name`` (None if it never does)."""
        task = self._named(name, "crossover")
        if not task.factors:
            return None
        table = self._calibrate(task)
        wins = [b for b in sorted(table) if table[b]["materialise"] < table[b]["lowrank"]]
        return wins[0] if wins else None

    # -- exports ----------------------------------------------------------------------------
    def state_dict_for(self, name: str | None) -> dict[str, Tensor]:
        """The full state dict of task ``name`` (a stored task or a merge; None: the base),
        in the wrapped model's key names, ready for ``load_state_dict``."""
        task = self.task(name)
        if task is None:
            return {k: t.clone() for k, t in self._base.items()}
        return task.apply(self._base)

    def export(self, name: str | None, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``state_dict_for(name)`` as a safetensors file, atomically: an existing ``path``
        is replaced only with ``overwrite=True``; missing parent folders are created (and
        removed again if the write fails)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            raise TSVInputError(f"{path}: is a folder; give a file path for the exported state dict")
        if path.exists() and not overwrite:
            raise TSVInputError(f"{path}: already exists; pass overwrite=True to replace it")
        state = {k: t.contiguous() for k, t in self.state_dict_for(name).items()}
        with staged_output(path, folder=False, overwrite=overwrite) as stage:
            save_file(state, stage / path.name, metadata={"format": "pt", "tsv_fast_task": name or "base"})
        return path

    def export_peft(self, name: str, folder: str | os.PathLike, **kwargs):
        """Write task ``name`` as a PEFT LoRA adapter folder (see :func:`tsv_fast.peft_export.export_peft`)."""
        from .peft_export import export_peft

        return export_peft(self._named(name, "export_peft"), folder, self.model, **kwargs)


def _converted(task: CompressedTask, fn, name: str | None = None) -> CompressedTask:
    """``task`` with ``fn`` applied to every factor and delta, each in its own compact storage."""
    return CompressedTask(name or task.name, {k: tuple(_compact(fn(t)) for t in f) for k, f in task.factors.items()},
                          {k: _compact(fn(t)) for k, t in task.deltas.items()})


def _compact(t: Tensor) -> Tensor:
    """``t`` alone in its storage: a view into a bigger tensor (``compress`` returns each
    task's factors as slices of the batched solver output) would keep all of it alive."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _forked_rng(device: torch.device):
    """``torch.random.fork_rng`` over the CPU generator and, on an accelerator, ``device``'s
    only (the default forks every GPU, one state copy each, and warns); a few µs."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _best_time(fn, device: torch.device, reps: int = 3) -> float:
    """Best of ``reps`` runs after one warm-up (seconds)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best
