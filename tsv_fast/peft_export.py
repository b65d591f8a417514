"""Export a compressed task as a PEFT LoRA adapter folder, so LoRA servers can load it.

A TSV-C factor triple is already a LoRA: ``ΔW = U diag(S) Vᵀ = B A`` with
``B = U diag(S)`` (out×k) and ``A = Vᵀ`` (k×in). PEFT's LoRA wraps ``nn.Linear``
modules, so only matrix keys that are the ``weight`` of an ``nn.Linear`` are exported;
the rest of the task (``in_proj_weight`` of ``nn.MultiheadAttention``, which is not a
Linear; the positional embedding, ``proj``, ``conv1``, biases, LayerNorm) cannot be
expressed as a PEFT LoRA and is listed in a warning and in the returned report.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import TSVInputError
from .writer import staged_output
from .tasks import CompressedTask, compute_dtype

__all__ = ["export_peft", "PeftExport"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass
class PeftExport:
    """What went into the adapter and what could not."""

    folder: Path
    rank: int
    target_modules: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)


def export_peft(task: CompressedTask, folder: str | os.PathLike, model: nn.Module, *,
                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> PeftExport:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``task``.

    Args:
        task: the compressed task (its keys are ``model.state_dict()`` keys).
        model: the base model, used to tell which keys belong to ``nn.Linear`` modules.
        base_model_name_or_path: recorded in the config (None: unknown).
        dtype: dtype of the LoRA tensors (default: the factors' dtype).

    PEFT has one rank ``r`` per adapter: it is the largest stored rank, and lower-rank
    layers are zero-padded (the extra rows of A and columns of B are zero, so ΔW is
    unchanged). ``lora_alpha = r`` makes PEFT's scaling ``alpha / r`` exactly 1.

    Caveat: ``nn.MultiheadAttention`` passes ``out_proj.weight`` straight to its
    functional forward, so a LoRA layer wrapped around ``attn.out_proj`` only takes
    effect once the adapter is merged into the weights (e.g. PEFT's ``merge_and_unload``).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TSVInputError(f"{folder}: exists and is not a folder; give a folder for the adapter")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise TSVInputError(f"{folder} exists and is not empty; pass overwrite=True to replace the adapter in it")
    modules = dict(model.named_modules())
    targets, skipped = [], []
    for key in task.factors:
        module_name, _, param = key.rpartition(".")
        if param == "weight" and isinstance(modules.get(module_name), nn.Linear):
            targets.append(module_name)
        else:
            skipped.append(key)
    skipped += sorted(task.deltas)
    if not targets:
        raise TSVInputError(f"task {task.name!r} has no factors on nn.Linear weights: nothing PEFT's LoRA can hold")
    r = max(task.factors[m + ".weight"][1].shape[0] for m in targets)
    tensors = {}
    for m in targets:
        U, S, V = task.factors[m + ".weight"]
        k = S.shape[0]
        out_dtype = dtype or U.dtype
        B = torch.zeros(U.shape[0], r, dtype=out_dtype)
        A = torch.zeros(r, V.shape[0], dtype=out_dtype)
        wide = torch.promote_types(compute_dtype(U), compute_dtype(S))  # float64 stays float64
        B[:, :k] = (U.to(wide) * S.to(wide)).to(out_dtype).cpu()
        A[:k] = V.T.to(out_dtype).cpu()
        tensors[f"base_model.model.{m}.lora_A.weight"] = A
        tensors[f"base_model.model.{m}.lora_B.weight"] = B
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": targets, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    # Both files are staged and moved in only when both are written: a failure leaves no half
    # adapter (nor new weights beside an old config), and removes the folders it created.
    with staged_output(folder / WEIGHTS, folder=False, overwrite=True) as stage:
        save_file(tensors, stage / WEIGHTS, metadata={"format": "pt"})
        (stage / CONFIG).write_text(json.dumps(config, indent=2))
    if skipped:
        warnings.warn(f"task {task.name!r}: {len(skipped)} key(s) are not nn.Linear weights and are not in the PEFT "
                      f"adapter (e.g. {skipped[:4]}); serve them with tsv_fast.MultiTaskModel or export the full "
                      f"state dict instead", stacklevel=2)
    return PeftExport(folder, r, targets, skipped)
