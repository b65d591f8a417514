"""Where does ``exact`` differ from the float64 algorithm? Key by key, then the worst key taken apart.

    python3 diagnose_exact.py --model ViT-B-32 --tasks 8 --blocks 12 --check-blocks 4 --device cuda

Same weights as ``bench_merge.py`` (base seed 0, task vectors seed 1, drawn on ``--device``).
On an H200 ``bench_merge.py --truth-blocks 4`` found ``exact`` 6.4e-2 from the float64 algorithm
at ViT-B/32, T = 8, while block 0 alone agreed to 1.6e-6 and the same route on the CPU agrees
to 5e-7 on every key. For the worst key this separates the suspects: the shape batch (the key
merged alone), the per-task top-k (device solver vs float64 eigh, with the spectral gap at k,
which says whether the top-k is well defined at all), and the rest (the same algorithm in
float64 on the CPU), and the whitening's pseudo-inverse cut (σmin/σmax of the concatenations;
the key merged with the cut of session 6 and before, 9.5e-7 instead of 1e-7).
"""

from __future__ import annotations

import argparse

import torch

import tsv_fast
from bench_merge import _rel, reference_tsv_m
from tsv_fast import solvers, tsv
from tsv_fast.keys import is_matrix_key
from tsv_fast.synthetic import CLIP_VITS, clip_vit_base, synthetic_task_vectors


def block_of(key: str) -> int:
    return int(key.split(".resblocks.")[1].split(".")[0])


def topk_report(X: torch.Tensor, k: int) -> list[str]:
    """Per task: the device solver's top-k against float64 eigh of the same float32 data."""
    got = solvers.exact_topk(X, k, torch.float64)
    short = got.V if X.shape[-2] >= X.shape[-1] else got.U  # vectors of the short side
    X64 = X.double().cpu()
    G = X64.mT @ X64 if X.shape[-2] >= X.shape[-1] else X64 @ X64.mT
    w, E = torch.linalg.eigh(G)
    w, E = w.flip(-1), E.flip(-1)
    rows = []
    for t in range(X.shape[0]):
        s2 = got.S[t].double().cpu() ** 2
        P = short[t].double().cpu()
        miss = (E[t, :, :k] - P @ (P.mT @ E[t, :, :k])).norm(dim=0)  # each true vector's part outside
        gap = (w[t, k - 1] - w[t, k]) / w[t, 0]
        rows.append(f"| {t} | {((s2 - w[t, :k]).abs().max() / w[t, 0]):.1e} | {miss.max():.1e} (vector "
                    f"{int(miss.argmax())}) | {gap:.1e} |")
    return rows


def concatenation_conditioning(X: torch.Tensor, k: int) -> str:
    """σmin/σmax of the concatenated top-k U and V (float64 SVDs of the float32 data), and how
    many singular values fall under the whitening's cut before session 7 (8·eps of float32)."""
    cut = 8 * torch.finfo(torch.float32).eps
    Us, Vs = [], []
    for t in X.double().cpu():
        U, _, Vh = torch.linalg.svd(t, full_matrices=False)
        Us.append(U[:, :k]), Vs.append(Vh[:k].T)
    parts = []
    for side, M in (("U", torch.cat(Us, 1)), ("V", torch.cat(Vs, 1))):
        s = torch.linalg.svdvals(M)
        parts.append(f"{side}: σmin/σmax {float(s[-1] / s[0]):.1e}, {int((s < cut * s[0]).sum())} under 9.5e-7")
        del M
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32", choices=sorted(CLIP_VITS))
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--blocks", type=int, default=12, help="blocks merged (as bench_merge.py)")
    p.add_argument("--check-blocks", type=int, default=4, help="blocks checked against float64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    width, _, patch, image = CLIP_VITS[args.model]
    base = clip_vit_base(width, args.blocks, patch, image)
    blocks = {k: v.to(args.device) for k, v in base.items() if ".resblocks." in k}
    taus = synthetic_task_vectors(blocks, args.tasks, seed=1, device=args.device)
    tvs = [tsv_fast.TaskVector(t) for t in taus]
    print(f"# {args.model}, T = {args.tasks}, {args.blocks} blocks on {args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}); {tsv_fast.backend()}")
    merged = tsv_fast.merge_layers(blocks, tvs)
    keys = [k for k in blocks if block_of(k) < args.check_blocks and is_matrix_key(k, blocks[k])]
    truth = reference_tsv_m({k: blocks[k].double().cpu() for k in keys},
                            [{k: t[k].double().cpu() for k in keys} for t in taus])
    err = {k: _rel(merged[k].double().cpu(), truth[k], blocks[k].double().cpu()) for k in keys}
    print("\n| key (exact, whole model merged) | error vs float64 algorithm |\n|---|---|")
    for k in sorted(keys, key=err.get, reverse=True)[:8]:
        print(f"| {k} | {err[k]:.1e} |")

    worst = max(keys, key=err.get)
    alone = tsv_fast.merge_layers({worst: blocks[worst]}, [tsv_fast.TaskVector({worst: t[worst]}) for t in taus])
    cpu64 = tsv_fast.merge_layers({worst: blocks[worst].double().cpu()},
                                  [tsv_fast.TaskVector({worst: t[worst].double().cpu()}) for t in taus])
    default_cut, tsv.WHITENING_RCOND = tsv.WHITENING_RCOND, 8 * torch.finfo(torch.float32).eps  # before session 7
    try:
        old_cut = tsv_fast.merge_layers({worst: blocks[worst]}, [tsv_fast.TaskVector({worst: t[worst]}) for t in taus])
    finally:
        tsv.WHITENING_RCOND = default_cut
    b64 = blocks[worst].double().cpu()
    X = torch.stack([t[worst] for t in taus])
    k = min(X.shape[-2:]) // args.tasks
    print(f"\nWorst key {worst} ({tuple(X.shape)}, k = {k}, route {solvers.exact_route(k, min(X.shape[-2:]), X.device)}):"
          f"\n- in the whole-model merge: {err[worst]:.1e}\n- merged alone on {args.device}: "
          f"{_rel(alone[worst].double().cpu(), truth[worst], b64):.1e}\n- merged alone in float64 on the CPU "
          f"(this library): {_rel(cpu64[worst].double(), truth[worst], b64):.1e}\n- merged alone on {args.device} "
          f"with session 6's whitening cut (9.5e-7 instead of 1e-7): {_rel(old_cut[worst].double().cpu(), truth[worst], b64):.1e}"
          f"\n- concatenations: {concatenation_conditioning(X, k)}\n")
    print("| task | top-k eigenvalues, max error ÷ λ1 | true top-k vectors outside the solver's span | gap (λk − λk+1)/λ1 |")
    print("|---|---|---|---|")
    print("\n".join(topk_report(X, k)))


if __name__ == "__main__":
    main()
