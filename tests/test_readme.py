"""The README's examples, executed: every fenced code block is found by parsing README.md,
so a new example is checked without touching this file.

How each block is checked:

* ``python``: run in a fresh namespace holding the names the examples assume (fixture
  ``prelude``: a tiny 12-block open_clip CLIP as ``pretrained`` and ``clip``, a copy as
  ``model``, fine-tuned variants, ``images``), with a fresh temporary folder as the working directory. A block of
  ``>>>`` lines is a transcript: its output is compared doctest-style.
* ``bash``: one command a line, run in order in a fresh folder holding the checkpoints the
  examples name (fixture ``checkpoints``). ``tsv-fast ...`` lines run the command line in-process
  (``cli.main``, globs expanded as the shell does) and must exit with 0; ``make ...`` and
  ``pip ...`` lines are not run (they set up machines and environments); any other command
  fails the test, so a new kind of command needs a rule here or a marker.
* other languages: only with a marker.

An HTML comment on the line before a block changes that:

* ``<!-- readme-test: skip (why) -->``: not run (it needs a GPU, the network, minutes).
* ``<!-- readme-test: run-only (why) -->``: a transcript run without comparing its output
  (it depends on the machine).
* ``<!-- readme-test: file NAME -->``: the block is the file NAME, written into the working
  folder of the bash blocks (e.g. the YAML job that ``tsv-fast merge job.yaml`` reads).

Every unmarked block that errors fails its test.
"""

from __future__ import annotations

import ast
import copy
import doctest
import glob
import importlib
import importlib.util
import inspect
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_runtime import finetune, tiny_clip

import tsv_fast
from tsv_fast import cli

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^( *)```(\w*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
DIRECTIVE = re.compile(r"^(skip|run-only) \((.+)\)$|^file (\S+)$")
NOT_RUN = ("make", "pip")  # bash lines that set up machines and environments
# The checkpoints the command-line examples name (tasks in ft/, one more outside it).
TASK_FILES = ["ft/sun397.safetensors", "ft/cars.safetensors", "ft/dtd.safetensors", "new_task.safetensors"]


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    directive: str | None = None  # "skip", "run-only" or "file"
    arg: str | None = None  # the reason, or the file name

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang or 'text'}"


def parse_blocks(text: str, source: str = "README.md") -> list[Block]:
    """The fenced code blocks of a markdown text, with the marker comment before each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        indent, lang = start.group(1), start.group(2)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == indent + "```"), None)
        if end is None:
            raise ValueError(f"{source}:{i + 1}: code block never closed")
        code = "\n".join(line[len(indent):] for line in lines[i + 1:end]) + "\n"
        block = Block(i + 1, lang, code)
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        if marker:
            directive = DIRECTIVE.match(marker.group(1))
            if not directive:
                raise ValueError(f"{source}:{i + 1}: bad readme-test marker {marker.group(1)!r}: "
                                 f"use 'skip (why)', 'run-only (why)' or 'file NAME'")
            block.directive = directive.group(1) or "file"
            block.arg = directive.group(2) or directive.group(3)
        blocks.append(block)
        i = end + 1
    return blocks


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- what the examples assume

@pytest.fixture(scope="module")
def prelude():
    """Names the Python examples use without defining (copied for each block)."""
    clip = tiny_clip(layers=12, width=32, image_size=32)  # block 11 exists, as in a CLIP ViT-B
    _, finetuned = finetune(clip, 3)
    models = []
    for state in finetuned:
        models.append(copy.deepcopy(clip))
        models[-1].load_state_dict(state)
    return {"pretrained": clip, "model": copy.deepcopy(clip), "clip": clip, "finetuned_models": models,
            "cars_state_dict": finetuned[0], "dtd_state_dict": finetuned[1],
            "images": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_base, small_tasks):
    """base.safetensors and the task files the command-line examples name."""
    folder = tmp_path_factory.mktemp("readme-ckpts")
    (folder / "ft").mkdir()
    save_file(small_base, folder / "base.safetensors")
    for name, task in zip(TASK_FILES, small_tasks, strict=True):
        save_file(task, folder / name)
    return folder


def run_python(block: Block, namespace: dict) -> None:
    if not block.code.lstrip().startswith(">>>"):
        exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
        return
    test = doctest.DocTestParser().get_doctest(block.code, namespace, f"README.md:{block.line}",
                                               str(README), block.line)
    if block.directive == "run-only":
        for example in test.examples:
            where = f"README.md:{block.line + example.lineno + 1}"
            exec(compile(example.source, where, "single"), namespace)
        return
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"README.md:{block.line}: the transcript's output differs (see above)"


def shell_glob(word: str) -> list[str]:
    """A word as the shell expands it: its sorted matches, or itself when nothing matches."""
    matches = sorted(glob.glob(word)) if any(c in word for c in "*?[") else []
    return matches or [word]


def run_bash(block: Block, files: list[Block]) -> None:
    for name in files:
        Path(name.arg).parent.mkdir(parents=True, exist_ok=True)
        Path(name.arg).write_text(name.code, encoding="utf-8")
    for offset, line in enumerate(block.code.splitlines(), start=1):
        argv = shlex.split(line, comments=True)
        where = f"README.md:{block.line + offset}"
        if not argv or argv[0] in NOT_RUN:
            continue
        assert argv[0] == "tsv-fast", f"{where}: no rule runs {argv[0]!r}: add one or mark the block"
        argv = [arg for pattern in argv[1:] for arg in shell_glob(pattern)]
        assert cli.main(argv) == 0, f"{where}: `{line.split('#')[0].strip()}` failed (its error is above)"


# --------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("block", [b for b in BLOCKS if b.directive not in ("skip", "file")], ids=lambda b: b.id)
def test_readme_block(block, prelude, checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if block.lang == "python":
        run_python(block, copy.deepcopy(prelude))
    elif block.lang == "bash":
        for f in checkpoints.rglob("*.safetensors"):
            (tmp_path / f.relative_to(checkpoints)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / f.relative_to(checkpoints)).symlink_to(f)
        run_bash(block, [b for b in BLOCKS if b.directive == "file"])
    else:
        pytest.fail(f"README.md:{block.line}: no rule runs a {block.lang or 'plain'} block: "
                    f"mark it (see this file's docstring)")


def test_markers_are_used():
    """Every marker belongs to a block, and the README has blocks of each kind checked."""
    text = README.read_text(encoding="utf-8").splitlines()
    markers = [i for i, line in enumerate(text, start=1) if MARKER.match(line)]
    marked = [b for b in BLOCKS if b.directive]
    assert len(markers) == len(marked), "a readme-test marker is not right before a code block"
    assert {"python", "bash"} <= {b.lang for b in BLOCKS if b.directive is None}


def test_failing_block_fails(tmp_path, monkeypatch):
    """The checks can fail: an erroring block, a wrong transcript, an unknown command, a bad marker."""
    monkeypatch.chdir(tmp_path)
    python, transcript, bash = parse_blocks(
        "```python\nundefined_name\n```\n\n```python\n>>> 1 + 1\n3\n```\n\n```bash\nrm -rf x\n```\n")
    with pytest.raises(NameError):
        run_python(python, {})
    with pytest.raises(AssertionError, match="output differs"):
        run_python(transcript, {})
    with pytest.raises(AssertionError, match="no rule runs 'rm'"):
        run_bash(bash, [])
    with pytest.raises(AssertionError, match="failed"):
        run_bash(parse_blocks("```bash\ntsv-fast merge missing.safetensors -o out.safetensors\n```\n")[0], [])
    with pytest.raises(ValueError, match="bad readme-test marker"):
        parse_blocks("<!-- readme-test: skip -->\n```python\npass\n```\n")


SIGNATURE = re.compile(r"\*\*`(?:tsv_fast\.)?(\w+)\(([^`]*)\)`\*\*")


def check_signature(name: str, documented: str) -> list[str]:
    """What a README signature ``name(a, b=1, *, c, ...)`` gets wrong about the code's."""
    fn = getattr(tsv_fast, name, None) or getattr(tsv_fast.MultiTaskModel, name)
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k != "self"}
    problems, listed, keyword_only = [], set(), False
    for item in (part.strip() for part in documented.split(",")):
        if item in ("...", ""):
            continue
        if item == "*":
            keyword_only = True
            continue
        key, _, default = item.lstrip("*").partition("=")
        listed.add(key)
        param = params.get(key)
        if param is None:
            problems.append(f"{name}: no parameter {key!r}")
        elif param.kind != (param.VAR_KEYWORD if item.startswith("**") else
                            param.KEYWORD_ONLY if keyword_only else param.POSITIONAL_OR_KEYWORD):
            problems.append(f"{name}: {key!r} is {param.kind.description}")
        elif default and ast.literal_eval(default) != param.default:
            problems.append(f"{name}: {key!r} defaults to {param.default!r}, not {default}")
    if "..." not in documented:
        problems += [f"{name}: {key!r} not listed" for key in params if key not in listed]
    return problems


def test_signatures_match_the_code():
    """The README's bold API signatures (**`name(...)`**) name real parameters, kinds and defaults."""
    found = SIGNATURE.findall(README.read_text(encoding="utf-8"))
    assert {"merge_layers", "compress", "reconstruct", "export"} <= {name for name, _ in found}
    assert [p for name, args in found for p in check_signature(name, " ".join(args.split()))] == []
    assert check_signature("export", "name, path, overwrite=False") == ["export: 'overwrite' is keyword-only"]
    assert check_signature("compress", "base, tasks, rank=1, *, energy, ...") == [
        "compress: 'rank' defaults to None, not 1"]


def resolve(name: str):
    """``tsv_fast.a.b`` as Python resolves it (attributes, else submodules); None if absent."""
    obj = tsv_fast
    for part in name.split(".")[1:]:
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif hasattr(obj, "__path__") and importlib.util.find_spec(f"{obj.__name__}.{part}"):  # a package
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            return None
    return obj


def test_dotted_names_exist():
    """Names like `tsv_fast.solvers.ROUTE_SHARE` or `solvers.GRAM_BLOCKS` in the README exist
    (short forms only for the modules of settings, whose names no example uses for a variable)."""
    text = README.read_text(encoding="utf-8")
    names = re.findall(r"`(tsv_fast(?:\.\w+)+)", text)
    names += ["tsv_fast." + n for n in re.findall(r"`((?:solvers|tsv|ops|methods)(?:\.\w+)+)", text)]
    names = sorted({name for name in names if not name.endswith(".py")})
    assert len(names) > 10 and resolve("tsv_fast.solvers.NO_SUCH_SETTING") is None
    assert [name for name in names if resolve(name) is None] == []
