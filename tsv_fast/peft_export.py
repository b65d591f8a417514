"""Export a compressed task as a PEFT LoRA adapter folder, so LoRA servers can load it.

A TSV-C factor triple is already a LoRA: ``ΔW = U diag(S) Vᵀ = B A`` with
``B = U diag(S)`` (out×k) and ``A = Vᵀ`` (k×in). Two kinds of weight take it, and PEFT
reproduces them exactly whether the adapter is merged or not:

* an ``nn.Linear``'s ``weight``;
* an ``nn.MultiheadAttention``'s ``in_proj_weight``, through PEFT's attention layer (the
  attention module is the target; query, key and value must share one ``in_proj_weight``),
  which PEFT has from version 0.15.0 on.

An attention module's ``out_proj.weight`` is left out: ``nn.MultiheadAttention`` never calls
``out_proj``'s forward, so PEFT ignores a LoRA on ``out_proj`` alone unless merged, and its
attention layer (PEFT 0.21) adds the ``out_proj`` delta twice (huggingface/peft#3774); the
adapter holds a zero ``out_proj`` LoRA there. That, the positional embedding, ``proj``,
``conv1``, embeddings, biases and LayerNorm are listed in a warning and in the returned report.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import TSVInputError
from .writer import staged_output
from .tasks import CompressedTask, compute_dtype

__all__ = ["export_peft", "PeftExport"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# First PEFT release whose LoRA wraps an nn.MultiheadAttention target (huggingface/peft#1324);
# 0.14 refuses to load such an adapter ("Target module MultiheadAttention(...) is not supported").
PEFT_MIN_VERSION_ATTENTION = "0.15.0"


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
        model: the base model, used to tell which keys belong to ``nn.Linear`` or
            ``nn.MultiheadAttention`` modules (and to check the factors' shapes).
        base_model_name_or_path: recorded in the config (None: unknown).
        dtype: dtype of the LoRA tensors (default: the factors' dtype).

    PEFT has one rank ``r`` per adapter: it is the largest stored rank, and lower-rank
    layers are zero-padded (the extra rows of A and columns of B are zero, so ΔW is
    unchanged). An attention module's out_proj LoRA is zero (see the module docstring).
    ``lora_alpha = r`` makes PEFT's scaling ``alpha / r`` exactly 1.

    Raises ImportError, writing nothing, when the adapter holds attention LoRAs and the PEFT
    imported or installed here is older than 0.15.0, the first that loads them.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TSVInputError(f"{folder}: exists and is not a folder; give a folder for the adapter")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise TSVInputError(f"{folder} exists and is not empty; pass overwrite=True to replace the adapter in it")
    slots, skipped = _lora_slots(task, model)
    if not slots:
        raise TSVInputError(f"task {task.name!r} has no factors on nn.Linear or nn.MultiheadAttention weights: "
                            f"nothing PEFT's LoRA can hold")
    attention = [prefix for prefix in slots if prefix + _OUT_PROJ in slots]
    if attention:
        _check_peft_version(attention)
    exported = [key for key, _ in slots.values() if key is not None]
    r = max(task.rank(key) for key in exported)
    tensors = {}
    for prefix, (key, (out_features, in_features)) in slots.items():
        out_dtype = dtype or task.factors[key or exported[0]][0].dtype
        B = torch.zeros(out_features, r, dtype=out_dtype)
        A = torch.zeros(r, in_features, dtype=out_dtype)
        if key is not None:
            U, S, V = task.factors[key]
            k = S.shape[0]
            wide = torch.promote_types(compute_dtype(U), compute_dtype(S))  # float64 stays float64
            B[:, :k] = (U.to(wide) * S.to(wide)).to(out_dtype).cpu()
            A[:k] = V.T.to(out_dtype).cpu()
        tensors[f"base_model.model.{prefix}.lora_A.weight"] = A
        tensors[f"base_model.model.{prefix}.lora_B.weight"] = B
    targets = list(dict.fromkeys(prefix.removesuffix(_OUT_PROJ) for prefix in slots))  # attention: once
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
        out_proj = [k for k in skipped if k.endswith(".out_proj.weight")]
        warnings.warn(f"task {task.name!r}: {len(skipped)} key(s) cannot be held by a PEFT LoRA and are not in the "
                      f"adapter (e.g. {skipped[:4]})" + (
                          f", among them {len(out_proj)} attention out_proj weight(s): PEFT ignores a LoRA on "
                          f"out_proj alone and, in its attention layer, adds it twice" if out_proj else "")
                      + "; serve them with tsv_fast.MultiTaskModel or export the full state dict instead",
                      stacklevel=2)
    return PeftExport(folder, r, targets, skipped)


# where PEFT's attention layer keeps the LoRA of out_proj, under the attention module's name
_OUT_PROJ = ".base_layer.out_proj"


def _lora_slots(task: CompressedTask, model: nn.Module) -> tuple[dict[str, tuple[str | None, tuple[int, int]]], list[str]]:
    """``{adapter prefix: (task key, or None for a zero LoRA; (out, in))}`` and the skipped keys."""
    modules = dict(model.named_modules())
    slots: dict[str, tuple[str | None, tuple[int, int]]] = {}
    skipped = []
    for key in task.factors:
        owner, _, param = key.rpartition(".")
        module = modules.get(owner)
        if param == "in_proj_weight" and _peft_attention(module):
            slots[owner] = (key, _checked_shape(task, key, module.in_proj_weight))
            # PEFT wraps out_proj with the attention module and expects its weights: zero ones
            slots[owner + _OUT_PROJ] = (None, tuple(module.out_proj.weight.shape))
        elif (param == "weight" and isinstance(module, nn.Linear)
              and not isinstance(modules.get(owner.rpartition(".")[0]), nn.MultiheadAttention)):
            slots[owner] = (key, _checked_shape(task, key, module.weight))
        else:
            skipped.append(key)
    return slots, skipped + sorted(task.deltas)


def _peft_version() -> str | None:
    """The PEFT that would load the adapter here: the imported module's, else the installed
    distribution's (read without importing peft, which pulls in transformers); None if none."""
    module = sys.modules.get("peft")
    if getattr(module, "__version__", None):
        return module.__version__
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_peft_version(attention: list[str]) -> None:
    """Refuse, before writing anything, an adapter with attention LoRAs that the PEFT here is too
    old to load. Without PEFT there is nothing to check: the adapter may be served elsewhere."""
    installed = _peft_version()
    if installed is None:
        return
    from packaging.version import Version  # a dependency of peft itself

    if Version(installed) < Version(PEFT_MIN_VERSION_ATTENTION):
        raise ImportError(f"peft {installed} is installed, but the adapter holds LoRAs on nn.MultiheadAttention "
                          f"modules (e.g. {attention[0]!r}), which PEFT loads only from version "
                          f"{PEFT_MIN_VERSION_ATTENTION} on: upgrade it (pip install 'peft>="
                          f"{PEFT_MIN_VERSION_ATTENTION}')")


def _peft_attention(module) -> bool:
    """An attention module PEFT's LoRA can wrap (one packed in_proj_weight, a Linear out_proj)."""
    return (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
            and isinstance(module.out_proj, nn.Linear))


def _checked_shape(task: CompressedTask, key: str, weight: Tensor) -> tuple[int, int]:
    """The weight's (out, in), after checking the factors fit it: an adapter for another model
    would only fail when PEFT loads it."""
    U, _, V = task.factors[key]
    if (U.shape[0], V.shape[0]) != tuple(weight.shape):
        raise TSVInputError(f"task {task.name!r}, key {key!r}: factors are for a {U.shape[0]}×{V.shape[0]} matrix "
                            f"but the model's weight is {tuple(weight.shape)}: the model is not the task's base")
    return tuple(weight.shape)
