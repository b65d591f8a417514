"""tsv-fast: merge and compress fine-tuned models with Task Singular Vectors.

* :func:`merge_layers` — TSV-M and the baselines (Task Arithmetic, TIES, averaging).
* :func:`compress` — TSV-C: per-task low-rank factors that rebuild each task.
* :func:`interference` — Singular Task Interference per layer and task pair.
* :class:`TaskStore` / :class:`MultiTaskModel` — many compressed tasks over one base,
  served per task, as mixed batches or as merges (open_clip CLIP ViT).
* :func:`backend` — whether the compiled C++/CUDA ops or the pure-PyTorch path is used.
"""

from .backend import Backend, backend
from .compress import compress, resolve_rank
from .errors import TSVInputError, TSVRankWarning
from .interference import Interference, interference
from .keys import is_matrix_key, select_keys
from .merge import iter_merge, merge_layers
from .methods import METHODS
from .ops import reconstruct
from .runtime import MultiTaskModel
from .solvers import SOLVERS
from .store import TaskStore
from .tasks import CompressedTask, TaskVector, task_vectors

__version__ = "0.1.0"

__all__ = [
    "Backend", "CompressedTask", "Interference", "METHODS", "MultiTaskModel", "SOLVERS", "TSVInputError",
    "TSVRankWarning", "TaskStore", "TaskVector", "__version__", "backend", "compress", "interference",
    "is_matrix_key", "iter_merge", "merge_layers", "reconstruct", "resolve_rank", "select_keys", "task_vectors",
]
