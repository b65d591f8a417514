"""vision-mini: a small open_clip ViT, pretrained here on real images, fine-tuned on 8+ tasks.

The model is open_clip's own ``VisionTransformer`` built from an open_clip vision config
(28×28 images, 7×7 patches, width 128, 4 blocks, 4 heads, embedding 64), wrapped so its
keys are those of a CLIP checkpoint (``visual.transformer.resblocks.0.attn.in_proj_weight``...).
Grayscale images are repeated to 3 channels, so ``conv1`` is open_clip's.

Protocol (as in the task-vector papers):

1. **Pretraining** (once, by the project: ``python -m tsv_fast.evaluation.vision_mini pretrain``):
   a 20-way cosine classifier over MNIST digits + Fashion-MNIST classes on their
   ``pretrain`` splits; the tower is committed in float16 under ``assets/``.
2. **Heads** (the zero-shot head analogue): for each task, the normalised mean
   pretrained embedding of each class (``--head-shots`` training images per class),
   computed once from the pretrained model and frozen. Logits = ``LOGIT_SCALE ·
   cos(embedding, class prototype)``, as CLIP's zero-shot classifier.
3. **Fine-tuning**: only the vision tower, heads frozen, per task; cached under
   ``~/.cache/tsv-fast/vision-mini/`` keyed by a hash of every setting, of the pretrained
   tower and of the task's training data.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import finetuning
from .data import CACHE_DIR, DatasetUnavailable, Images, source_split

ASSET = Path(__file__).parent / "assets" / "vision_mini_pretrained.safetensors"

# An open_clip model config (the ``vision_cfg`` / ``embed_dim`` of open_clip's model JSONs).
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 128, "layers": 4, "head_width": 32,
                   "mlp_ratio": 4.0},
}
LOGIT_SCALE = 30.0
CACHE_VERSION = 1  # bump when fine-tuning code changes results


# --------------------------------------------------------------------------- model


def build_tower(cfg: dict = MODEL_CFG) -> nn.Module:
    """open_clip's vision tower from an open_clip config (``_build_vision_tower``, or the
    ``VisionTransformer`` it would build when that helper is not available)."""
    try:
        from open_clip.model import _build_vision_tower
        return _build_vision_tower(cfg["embed_dim"], dict(cfg["vision_cfg"]))
    except ImportError:  # pragma: no cover - older/newer open_clip layouts
        from open_clip.transformer import VisionTransformer
        v = cfg["vision_cfg"]
        return VisionTransformer(image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                                 layers=v["layers"], heads=v["width"] // v["head_width"],
                                 mlp_ratio=v["mlp_ratio"], output_dim=cfg["embed_dim"])


class VisionMini(nn.Module):
    """``visual`` = an open_clip vision tower; ``forward`` maps uint8 N×28×28 images to
    unit-norm embeddings."""

    def __init__(self, cfg: dict = MODEL_CFG):
        super().__init__()
        self.visual = build_tower(cfg)

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().div(127.5).sub(1.0).unsqueeze(1).expand(-1, 3, -1, -1)
        return F.normalize(self.visual(x), dim=-1)


def load_pretrained(path: Path = ASSET) -> dict[str, Tensor]:
    """The committed pretrained tower (float16 on disk), as a float32 state dict."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: pretrained tower not found (the committed one, {ASSET.name}, is "
                                f"remade by `python -m tsv_fast.evaluation.vision_mini pretrain`)")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str  # mnist, fashion, digits
    classes: tuple[str, ...]
    description: str
    make: Callable[[Images, str], Images]  # (source split, split name) -> task images/labels


def _same(data: Images, split: str) -> Images:
    return data


def _relabel(fn: Callable[[Tensor], Tensor]):
    return lambda data, split: Images(data.images, fn(data.labels))


def _split_generator(name: str, split: str) -> torch.Generator:
    seed = int(hashlib.sha256(f"{name}/{split}".encode()).hexdigest()[:8], 16)
    return torch.Generator().manual_seed(seed)


def _rotations(name: str):
    def make(data: Images, split: str) -> Images:
        quarter = torch.randint(0, 4, (len(data),), generator=_split_generator(name, split))
        images = data.images.clone()
        for q in range(1, 4):
            sel = quarter == q
            images[sel] = torch.rot90(data.images[sel], q, dims=(1, 2))
        return Images(images, quarter)
    return make


def _inverted(data: Images, split: str) -> Images:
    return Images(255 - data.images, data.labels)


def stroke_width(images: Tensor) -> Tensor:
    """Mean stroke width estimate per image: 2 · ink area / ink boundary length (pixels)."""
    ink = images > 127
    padded = F.pad(ink, (1, 1, 1, 1))
    inner = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    boundary = (ink & ~inner).flatten(1).sum(1).clamp(min=1)
    return 2 * ink.flatten(1).sum(1) / boundary


@functools.lru_cache(maxsize=1)
def _stroke_cuts() -> Tensor:
    """Tertiles of the stroke width over MNIST's pretrain split: 3 balanced classes."""
    reference = stroke_width(source_split("mnist", "pretrain").images).float()
    return torch.quantile(reference, torch.tensor([1 / 3, 2 / 3]))


def _stroke(data: Images, split: str) -> Images:
    return Images(data.images, torch.bucketize(stroke_width(data.images).float(), _stroke_cuts()))


FASHION = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
DIGITS = tuple(str(i) for i in range(10))
ROTATIONS = ("0°", "90°", "180°", "270°")
_FASHION_GROUP = torch.tensor([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("mnist", "mnist", DIGITS, "MNIST digit", _same),
    TaskSpec("fashion", "fashion", FASHION, "Fashion-MNIST class", _same),
    TaskSpec("digits", "digits", DIGITS, "scikit-learn 8×8 digits, upsampled", _same),
    TaskSpec("mnist_rotation", "mnist", ROTATIONS, "rotation of an MNIST digit (0/90/180/270°)",
             _rotations("mnist_rotation")),
    TaskSpec("fashion_inverted", "fashion", FASHION, "Fashion-MNIST class, colours inverted", _inverted),
    TaskSpec("mnist_parity", "mnist", ("even", "odd"), "parity of an MNIST digit", _relabel(lambda y: y % 2)),
    TaskSpec("mnist_stroke", "mnist", ("thin", "medium", "thick"), "stroke width tertile of an MNIST digit",
             _stroke),
    TaskSpec("fashion_group", "fashion", ("top", "legwear/dress", "footwear", "bag"),
             "Fashion-MNIST garment group", _relabel(lambda y: _FASHION_GROUP[y])),
    TaskSpec("mnist_magnitude", "mnist", ("0-4", "5-9"), "MNIST digit ≥ 5", _relabel(lambda y: (y >= 5).long())),
    TaskSpec("digits_rotation", "digits", ROTATIONS, "rotation of a scikit-learn digit",
             _rotations("digits_rotation")),
]}
DEFAULT_TASKS = list(TASKS)[:8]


_TASK_DATA: dict[tuple[str, str], Images] = {}


def task_data(name: str, split: str) -> Images:
    """Images and labels of task ``name`` on ``split`` (train / val / test), memoised."""
    if (name, split) not in _TASK_DATA:
        spec = TASKS[name]
        _TASK_DATA[name, split] = spec.make(source_split(spec.source, split), split)
    return _TASK_DATA[name, split]


def train_data_digest(name: str) -> str:
    """A hash of task ``name``'s training images and labels, as read from the data files: the
    fine-tune and its head depend on them, so replaced or changed data files must miss the
    cache. Hashing the decoded data (milliseconds, the files are read anyway) also catches a
    change in the middle of a file, which a fingerprint of its first and last MiB would not."""
    data = task_data(name, "train")
    h = hashlib.sha256()
    for t in (data.images, data.labels):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def available_tasks(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(tasks whose data loads, {task: reason} for the others)."""
    ok, missing = [], {}
    for name in names:
        try:
            task_data(name, "test")
            ok.append(name)
        except DatasetUnavailable as e:
            missing[name] = str(e)
    return ok, missing


_SUBSETS: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}


def _limit(data: Images, n: int | None, name: str, split: str) -> Images:
    """The first ``n`` of a fixed permutation of ``data``. Tasks built on the same source
    images (mnist, mnist_parity, mnist_stroke...) get the same subset, as the same tensor,
    so evaluation embeds those images once."""
    if n is None or n >= len(data):
        return data
    key = (id(data.images), n)
    if key not in _SUBSETS or _SUBSETS[key][0] is not data.images:
        source = TASKS[name].source
        order = torch.randperm(len(data), generator=_split_generator(source, split + "/subset"))[:n]
        _SUBSETS[key] = (data.images, order, data.images[order])
    _, order, images = _SUBSETS[key]
    return Images(images, data.labels[order])


# --------------------------------------------------------------------------- training


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(model: VisionMini, head: Tensor, data: Images, *, steps: int, lr: float, batch: int,
           weight_decay: float, seed: int, params=None, log_every: int = 0, tag: str = "") -> None:
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    order, pos = torch.randperm(len(data), generator=gen), 0
    model.train()
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, steps, warmup)
        emb = model(data.images[idx])
        logits = LOGIT_SCALE * emb @ (F.normalize(head, dim=-1) if head.requires_grad else head).T
        loss = F.cross_entropy(logits, data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  {tag} step {step:5d}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()


def pretrain(steps: int = 2000, batch: int = 128, lr: float = 1e-3, seed: int = 0,
             out: Path = ASSET) -> Path:
    """Pretrain the tower (20-way cosine classifier on MNIST + Fashion-MNIST pretrain splits)
    and write it in float16 safetensors with its settings as metadata."""
    mnist, fashion = source_split("mnist", "pretrain"), source_split("fashion", "pretrain")
    data = Images(torch.cat([mnist.images, fashion.images]), torch.cat([mnist.labels, fashion.labels + 10]))
    torch.manual_seed(seed)
    model = VisionMini()
    classifier = nn.Parameter(torch.randn(20, MODEL_CFG["embed_dim"]) * 0.1)
    start = time.perf_counter()
    _train(model, classifier, data, steps=steps, lr=lr, batch=batch, weight_decay=0.05, seed=seed,
           params=list(model.parameters()) + [classifier], log_every=max(1, steps // 20), tag="pretrain")
    seconds = time.perf_counter() - start
    accs = {}
    with torch.inference_mode():
        for source, offset in (("mnist", 0), ("fashion", 10)):
            test = source_split(source, "test")
            pred = (model(test.images) @ F.normalize(classifier, dim=-1).T).argmax(1)
            accs[source] = (pred == test.labels + offset).float().mean().item()
    print(f"pretrained in {seconds:.0f} s; 20-way test accuracy {accs}")
    out = Path(out)
    meta = {"model_cfg": MODEL_CFG, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "data": "MNIST train[:40000] + Fashion-MNIST train[:40000], 20-way cosine classifier",
            "test_accuracy_20way": accs, "seconds": round(seconds, 1),
            "command": f"python -m tsv_fast.evaluation.vision_mini pretrain --steps {steps} --seed {seed}"}
    finetuning.save_state({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, out,
                          {"tsv_fast_vision_mini": json.dumps(meta)})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return out


@torch.inference_mode()
def embed(model: VisionMini, images: Tensor, batch: int = 1000) -> Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def make_head(model: VisionMini, name: str, shots: int) -> Tensor:
    """Frozen head of task ``name``: the normalised mean pretrained embedding of ``shots``
    training images per class (C × embed_dim)."""
    data = task_data(name, "train")
    gen = _split_generator(name, "head")
    rows = []
    for c in range(len(TASKS[name].classes)):
        idx = (data.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)[:shots]]
        rows.append(F.normalize(embed(model, data.images[idx]).mean(0), dim=0))
    return torch.stack(rows)


@dataclass
class Settings:
    steps: int = 400
    batch: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    head_shots: int = 64
    train_size: int | None = None  # examples per task for fine-tuning (None: all)
    val_size: int | None = 500
    test_size: int | None = 1000
    seed: int = 0

    def finetune_key(self, pretrained_digest: str, task: str, data_digest: str) -> str:
        """The cache key of a fine-tune: pretrained weights, training data (``train_data_digest``)
        and every setting that changes the result."""
        fields = {"v": CACHE_VERSION, "pretrained": pretrained_digest, "task": task, "data": data_digest,
                  "cfg": MODEL_CFG,
                  "steps": self.steps, "batch": self.batch, "lr": self.lr, "wd": self.weight_decay,
                  "shots": self.head_shots, "train_size": self.train_size, "seed": self.seed,
                  "scale": LOGIT_SCALE}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


class VisionMiniBench:
    """Pretrained weights, frozen heads, cached fine-tunes and evaluation for one setting."""

    def __init__(self, tasks: Sequence[str], settings: Settings, cache_dir: Path | None = None,
                 pretrained: Path = ASSET, log=print):
        self.tasks = list(tasks)
        self.settings = settings
        self.log = log
        self.cache_dir, self.pretrained_path = cache_dir, Path(pretrained)
        self.cache = Path(cache_dir or CACHE_DIR) / "vision-mini"
        self.base = load_pretrained(pretrained)  # first: its error says what is missing
        self.pretrained_digest = file_digest(pretrained)
        self.model = VisionMini()
        self.model.load_state_dict(self.base)
        self.model.eval()
        self.heads: dict[str, Tensor] = {}
        self.finetune_seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}
        self._data_digests: dict[str, str] = {}

    def compute_heads(self) -> None:
        self.model.load_state_dict(self.base)
        for name in self.tasks:
            self.heads[name] = make_head(self.model, name, self.settings.head_shots)

    def cache_path(self, name: str) -> Path:
        if name not in self._data_digests:
            self._data_digests[name] = train_data_digest(name)
        key = self.settings.finetune_key(self.pretrained_digest, name, self._data_digests[name])
        return self.cache / key / f"{name}.safetensors"

    def finetune_all(self, jobs: int = 1, log: Callable[[str], None] = print) -> dict[str, dict[str, Tensor]]:
        """Every task's fine-tuned state dict; with ``jobs > 1`` the missing ones are trained
        in that many worker processes (one torch thread each), which on a small CPU beats
        one process with several threads for a model this small."""
        return finetuning.finetune_all(self, jobs, log, _finetune_job, lambda n: (
            n, self.settings, self.cache_dir, self.pretrained_path, self.heads[n]))

    def finetune(self, name: str) -> dict[str, Tensor]:
        """Fine-tuned state dict of task ``name`` (from the cache when the same settings ran before)."""
        from safetensors.torch import load_file

        s = self.settings
        path = self.cache_path(name)
        if path.is_file():
            self.cached[name], self.finetune_seconds[name] = True, 0.0
            return load_file(str(path))
        torch.manual_seed(s.seed)
        model = VisionMini()
        model.load_state_dict(self.base)
        data = _limit(task_data(name, "train"), s.train_size, name, "train")
        start = time.perf_counter()
        seed = s.seed * 1000 + int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
        _train(model, self.heads[name], data, steps=s.steps, lr=s.lr, batch=s.batch,
               weight_decay=s.weight_decay, seed=seed)
        self.finetune_seconds[name] = time.perf_counter() - start
        self.cached[name] = False
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        finetuning.save_state(state, path, {"task": name, "seconds": f"{self.finetune_seconds[name]:.2f}"})
        return state

    @torch.inference_mode()
    def evaluate(self, state: dict[str, Tensor], tasks: Sequence[str], split: str) -> dict[str, float]:
        """Accuracy of the tower ``state`` with each task's frozen head, on ``split`` (val / test)."""
        self.model.load_state_dict(state)
        self.model.eval()
        n = self.settings.val_size if split == "val" else self.settings.test_size
        out, embedded = {}, {}
        for name in tasks:
            data = _limit(task_data(name, split), n, name, split)
            if id(data.images) not in embedded:  # tasks sharing images share the forward pass
                embedded[id(data.images)] = embed(self.model, data.images)
            pred = (embedded[id(data.images)] @ self.heads[name].T).argmax(1)
            out[name] = (pred == data.labels).float().mean().item()
        return out

    def split_sizes(self) -> dict[str, dict[str, int]]:
        s = self.settings
        return {name: {"train": len(_limit(task_data(name, "train"), s.train_size, name, "train")),
                       "val": len(_limit(task_data(name, "val"), s.val_size, name, "val")),
                       "test": len(_limit(task_data(name, "test"), s.test_size, name, "test"))}
                for name in self.tasks}


def _finetune_job(args) -> tuple[str, float]:
    """Worker process: fine-tune one task into the cache."""
    name, settings, cache_dir, pretrained, head = args
    torch.set_num_threads(1)
    bench = VisionMiniBench([name], settings, cache_dir=cache_dir, pretrained=pretrained)
    bench.heads[name] = head
    bench.finetune(name)
    return name, bench.finetune_seconds[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tsv_fast.evaluation.vision_mini",
                                     description="vision-mini maintenance commands")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the tower and write the float16 asset")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ASSET)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrain(args.steps, args.batch, args.lr, args.seed, args.out)


if __name__ == "__main__":
    main()
