"""CLIP-ViT-shaped weights and task vectors for tests, benchmarks and the demo.

Model hubs are out of reach here, so the base is an open_clip ``VisionTransformer``
with random weights (real key names and shapes), and each task's delta on a matrix key
has an exact power-law spectrum ``s_i ∝ i^-decay`` on random singular vectors, plus a
component shared by all tasks (the cross-task overlap that TSV-M removes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .keys import is_matrix_key, is_mergeable

# (width, layers, patch, image) of the CLIP visual towers SPEC.md lists.
CLIP_VITS = {
    "ViT-B-32": (768, 12, 32, 224),
    "ViT-B-16": (768, 12, 16, 224),
    "ViT-L-14": (1024, 24, 14, 224),
}


def clip_vit_base(
    width: int = 768, layers: int = 12, patch_size: int = 32, image_size: int = 224,
    embed_dim: int = 512, seed: int = 0,
) -> dict[str, Tensor]:
    """State dict of an open_clip CLIP visual tower (``visual.*`` keys) with random weights."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    tower = VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                              heads=max(1, width // 64), mlp_ratio=4.0, output_dim=embed_dim)
    return {f"visual.{k}": v.detach() for k, v in tower.state_dict().items()}


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=gen, device=gen.device))
    return Q * torch.sign(torch.diagonal(R))  # Haar-distributed


def power_law_matrix(m: int, n: int, gen: torch.Generator, decay: float = 0.5) -> Tensor:
    """Random m×n matrix of unit Frobenius norm with singular values ∝ i^-decay."""
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float32, device=gen.device) ** -decay
    s /= s.norm()
    return (_orthonormal(m, r, gen) * s) @ _orthonormal(n, r, gen).T


def correlated_tasks(m: int, n: int, count: int, gen: torch.Generator, decay: float = 0.5,
                     shared: float = 0.3) -> list[Tensor]:
    """``count`` m×n task matrices ``√(1−shared)·A_t + √shared·C``: power-law parts of their
    own (:func:`power_law_matrix`) and one part C common to all, the cross-task overlap TSV-M
    removes (C drawn first)."""
    common = power_law_matrix(m, n, gen, decay)
    return [(1 - shared) ** 0.5 * power_law_matrix(m, n, gen, decay) + shared ** 0.5 * common
            for _ in range(count)]


def synthetic_task_vectors(
    base: dict[str, Tensor], num_tasks: int, *, seed: int = 0, decay: float = 0.5,
    shared: float = 0.3, scale: float = 0.05, device: str | torch.device = "cpu",
) -> list[dict[str, Tensor]]:
    """``num_tasks`` task vectors for ``base``: per matrix key
    ``scale·‖W0‖·(√(1−shared)·A_t + √shared·C)`` with power-law ``A_t`` and a shared ``C``;
    small Gaussian deltas elsewhere. ``device`` is where they are drawn and stay (a GPU
    makes ViT-L/14-sized sets in seconds; its random stream differs from the CPU's)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    taus: list[dict[str, Tensor]] = [{} for _ in range(num_tasks)]
    for key, w in base.items():
        if not is_mergeable(w):
            continue
        size = scale * w.float().norm().clamp(min=1e-3).to(device)
        if is_matrix_key(key, w):
            for tau, delta in zip(taus, correlated_tasks(*w.shape, num_tasks, gen, decay, shared)):
                tau[key] = (size * delta).to(w.dtype)
        else:
            for tau in taus:
                noise = torch.randn(w.shape, generator=gen, device=gen.device)
                tau[key] = (size * noise / noise.norm().clamp(min=1e-12)).to(w.dtype)
    return taus


def synthetic_finetuned(base: dict[str, Tensor], num_tasks: int, **kwargs) -> list[dict[str, Tensor]]:
    """Fine-tuned state dicts ``θ0 + τ_t`` (integer buffers copied from the base)."""
    return [{k: (w + tau[k] if k in tau else w.clone()) for k, w in base.items()}
            for tau in synthetic_task_vectors(base, num_tasks, **kwargs)]
