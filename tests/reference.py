"""Float64 NumPy reference implementations, written from SPEC.md and nothing else.

They share no code with tsv_fast. The polar factor here uses the whitening form
``U (UᵀU)^(-1/2)`` (eigendecomposition), not the library's SVD route, so the two
agree only if both are right (on well-conditioned inputs, where the forms coincide).
"""

from __future__ import annotations

import numpy as np


def np64(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def is_matrix(name: str, a: np.ndarray) -> bool:
    return a.ndim == 2 and "text_projection" not in name


def top_k(tau: np.ndarray, k: int):
    U, S, Vt = np.linalg.svd(tau, full_matrices=False)
    return U[:, :k], S[:k], Vt[:k].T


def nonzero_top_k(taus: list[np.ndarray], k: int, eps: float):
    """Each task's top-k triplets whose s is not zero to the inputs' precision ``eps`` (README:
    s > max(1e-7, 4·eps·√max(m, n))·s1), concatenated: a triplet with s = 0 carries nothing, and
    its singular vectors are any basis of a null space."""
    cut = max(1e-7, 4 * eps * max(taus[0].shape) ** 0.5)
    parts = [top_k(t, k) for t in taus]
    keep = [p[1] > cut * p[1][0] if p[1][0] > 0 else np.zeros_like(p[1], bool) for p in parts]
    return tuple(np.concatenate([p[i][..., c] for p, c in zip(parts, keep)], axis=-1) for i in range(3))


def whiten(X: np.ndarray) -> np.ndarray:
    """X (XᵀX)^(-1/2)."""
    w, Q = np.linalg.eigh(X.T @ X)
    return X @ (Q / np.sqrt(w)) @ Q.T


def tsv_m_delta(taus: list[np.ndarray], k: int | None = None) -> np.ndarray:
    T = len(taus)
    k = min(taus[0].shape) // T if k is None else k
    if k == 0:
        return np.zeros_like(taus[0])
    parts = [top_k(t, k) for t in taus]
    U = np.concatenate([p[0] for p in parts], axis=1)
    S = np.concatenate([p[1] for p in parts])
    V = np.concatenate([p[2] for p in parts], axis=1)
    return whiten(U) @ np.diag(S) @ whiten(V).T


def merge(base: dict, finetuned: list[dict], method: str, alpha: float, density: float = 0.2,
          rank: int | None = None) -> dict:
    """Merged float64 arrays for every floating key of ``base`` (torch tensors in, NumPy out)."""
    out = {}
    T = len(finetuned)
    for key, b in base.items():
        if not b.is_floating_point():
            continue
        b0 = np64(b)
        taus = [np64(ft[key]) - b0 for ft in finetuned]
        if method == "tsv":
            delta = tsv_m_delta(taus, rank) if is_matrix(key, b0) else sum(taus) / T
        elif method == "task_arithmetic":
            delta = sum(taus)
        elif method == "mean":
            delta = np.mean([np64(ft[key]) for ft in finetuned], axis=0) - b0
        elif method == "ties":
            delta = ties(taus, density)
        else:
            raise ValueError(method)
        out[key] = b0 + alpha * delta
    return out


def ties(taus: list[np.ndarray], density: float) -> np.ndarray:
    """Trim each task to its top-density magnitudes, elect signs, disjoint mean."""
    trimmed = []
    for t in taus:
        flat = t.ravel()
        keep = max(1, int(round(density * flat.size)))
        cut = np.sort(np.abs(flat))[::-1][keep - 1]
        trimmed.append(np.where(np.abs(t) >= cut, t, 0.0))
    stack = np.stack(trimmed)
    elected = np.sign(stack.sum(0))
    total = np.zeros_like(taus[0])
    count = np.zeros_like(taus[0])
    for t in trimmed:
        agree = (np.sign(t) == elected) & (t != 0)
        total += np.where(agree, t, 0.0)
        count += agree
    return total / np.maximum(count, 1)


def sti(taus: list[np.ndarray], k: int) -> float:
    """‖(UᵀU − I) diag(S) (VᵀV − I)‖₁ with U, S, V concatenated (not orthogonalised)."""
    parts = [top_k(t, k) for t in taus]
    U = np.concatenate([p[0] for p in parts], axis=1)
    S = np.concatenate([p[1] for p in parts])
    V = np.concatenate([p[2] for p in parts], axis=1)
    eye = np.eye(U.shape[1])
    return float(np.abs((U.T @ U - eye) @ np.diag(S) @ (V.T @ V - eye)).sum())


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
