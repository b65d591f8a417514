"""The eight text-classification tasks of text-8, built at run time from Debian packages.

Nothing is committed: each task is derived from text that ships in a Debian package, so the
data is real, offline and reproducible on any Debian/Ubuntu machine.

* **package_section**, **package_language**: the package list (``apt-cache dumpavail``,
  after ``apt-get update``; cached as ``packages.txt``). Section: a package's short
  description → its archive section. Language: the description of a language ecosystem's
  library (``python3-*``, ``libghc-*``, ``r-cran-*``, ...) → the language, with the language
  names and their package tools masked (``[MASK]``) and packaging suffixes
  (``- Rust source code``, ``; documentation``, ``(Go library)``) removed.
* **wordnet_noun**, **wordnet_verb**: ``wordnet-base`` definitions → lexicographer file
  (``noun.animal``, ``verb.motion``...).
* **kjv_books**: ``bible-kjv`` verses → group of books (law, history, wisdom...); the
  ``bible`` program decodes its compressed text (cached as ``kjv.txt``). Splits go by
  chapter, so neighbouring verses never straddle train and test.
* **fortune_topic**, **fortune_collection**: quotes from ``fortunes`` (+
  ``fortune-anarchism``, ``fortunes-bofh-excuses``) → the fortune file: eight topical files
  for the topic, eight files with a style of their own for the collection; no file is in both.
* **word_language**: four random words → the ``w*`` word list (``wamerican``, ``wfrench``...)
  they come from; each split draws from its own words, and words of several lists are dropped.

Splits are deterministic (a hash of the task and of the example's group) and disjoint; every
builder raises :class:`~tsv_fast.evaluation.data.DatasetUnavailable` naming the package and the
install command when its source is missing. ``TSV_FAST_TEXT8_ROOT`` points every source at one
folder (``packages.txt``, ``kjv.txt``, ``wordnet/``, ``fortunes/``, ``dict/``), for tests.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import random
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .data import CACHE_DIR, DatasetUnavailable

INSTALL_HINT = "run `scripts/install_data.sh .venv/bin/python text` (or `make data-text`)"
SPLITS = ("train", "val", "test")
MASK = "[MASK]"


@dataclass(frozen=True)
class Sources:
    """Where each source is read from."""

    packages: Path  # output of `apt-cache dumpavail`
    kjv: Path  # output of `bible -f Gen1:1-Rev22:21`
    wordnet: Path  # data.noun, data.verb
    fortunes: Path  # fortune files (entries separated by lines "%")
    dict: Path  # word lists, one word per line
    generate: bool  # make packages.txt / kjv.txt from apt-cache / bible when missing


def sources() -> Sources:
    root = os.environ.get("TSV_FAST_TEXT8_ROOT")
    if root:
        r = Path(root)
        return Sources(r / "packages.txt", r / "kjv.txt", r / "wordnet", r / "fortunes", r / "dict", generate=False)
    cache = CACHE_DIR / "text-8"
    return Sources(cache / "packages.txt", cache / "kjv.txt", Path("/usr/share/wordnet"),
                   Path("/usr/share/games/fortunes"), Path("/usr/share/dict"), generate=True)


@dataclass
class Examples:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


# --------------------------------------------------------------------------- splitting


def _unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from strings (same on every machine and run)."""
    return int(hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12], 16) / 16 ** 12


@dataclass(frozen=True)
class SplitPlan:
    test: float = 0.25  # fraction of groups
    val: float = 0.10
    cap: tuple[int, int, int] = (2000, 100, 250)  # at most this many examples per class: train, val, test


def split_examples(task: str, items: Iterable[tuple[str, int, str]], n_classes: int,
                   plan: SplitPlan = SplitPlan()) -> dict[str, Examples]:
    """``(text, label, group)`` items → disjoint train/val/test splits.

    Exact duplicate texts are kept once, and dropped when they carry two labels. A group's
    items all go to one split (a hash of task and group picks which); within a split each
    class keeps at most ``plan.cap`` items, chosen by a hash of the text, in a fixed order.
    """
    label_of: dict[str, int] = {}
    group_of: dict[str, str] = {}
    conflicted = set()
    for text, label, group in items:
        text = text.strip()
        if not text:
            continue
        if text in label_of and label_of[text] != label:
            conflicted.add(text)
        label_of.setdefault(text, label)
        group_of.setdefault(text, group)
    buckets: dict[str, list[list[str]]] = {s: [[] for _ in range(n_classes)] for s in SPLITS}
    for text, label in label_of.items():
        if text in conflicted:
            continue
        u = _unit(task, "split", group_of[text])
        split = "test" if u < plan.test else "val" if u < plan.test + plan.val else "train"
        buckets[split][label].append(text)
    out = {}
    for split, cap in zip(SPLITS, plan.cap):
        texts, labels = [], []
        for label, members in enumerate(buckets[split]):
            members.sort(key=lambda t: _unit(task, "order", t))
            texts += members[:cap]
            labels += [label] * min(cap, len(members))
        out[split] = Examples(texts, labels)
    return out


# --------------------------------------------------------------------------- sources


def _generated(path: Path, command: list[str], package: str, generate: bool) -> Path:
    """``path``, made from ``command``'s output (then cached) when it is missing."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    if not generate or shutil.which(command[0]) is None:
        raise DatasetUnavailable(f"{path} not found and `{command[0]}` is not available: install {package}; "
                                 f"{INSTALL_HINT}")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise DatasetUnavailable(f"`{' '.join(command)}` gave no text ({done.stderr.strip()[:200]}): "
                                 f"install {package}; {INSTALL_HINT}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(done.stdout, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_packages(path: Path) -> list[dict[str, str]]:
    """Records (``Package``, ``Section``, ``Description``...) of an ``apt-cache dumpavail`` file;
    continuation lines are skipped (only the first line of a description is there)."""
    records, current = [], {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                if current:
                    records.append(current)
                current = {}
            elif not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                current[key] = value.strip()
    if current:
        records.append(current)
    return records


def packages(src: Sources) -> list[dict[str, str]]:
    path = _generated(src.packages, ["apt-cache", "dumpavail"], "apt (and run apt-get update)", src.generate)
    records = [r for r in read_packages(path) if "Package" in r and "Description" in r]
    if len(records) < 100:
        if src.generate:  # made from empty apt lists: make it again after apt-get update
            path.unlink(missing_ok=True)
        raise DatasetUnavailable(f"{path} has only {len(records)} packages: run `apt-get update` (and delete "
                                 f"{path} if it is still there); {INSTALL_HINT}")
    return records


def read_fortunes(path: Path) -> list[str]:
    """The quotes of a fortune file (separated by lines ``%``), whitespace collapsed."""
    if not path.is_file():
        raise DatasetUnavailable(f"fortune file {path} not found")
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [" ".join(entry.split()) for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE) if entry.strip()]


def read_words(path: Path) -> list[str]:
    """A word list (UTF-8, or Latin-1 as Debian's Swedish one): single alphabetic words, lowercased."""
    if not path.is_file():
        raise DatasetUnavailable(f"word list {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return sorted({w.strip().lower() for w in text.splitlines() if w.strip().isalpha()})


# --------------------------------------------------------------------------- package descriptions


SECTIONS = ("admin", "devel", "games", "graphics", "net", "science", "sound", "text")

# label: package-name pattern of the language's library packages
LANGUAGES = {
    "python": r"python3-.+",
    "haskell": r"libghc-.+",
    "r": r"r-(?:cran|bioc)-.+",
    "ruby": r"ruby-.+",
    "go": r"golang-.+",
    "javascript": r"node-.+",
    "perl": r"lib.+-perl",
    "rust": r"librust-.+",
}
_LANGUAGE_RE = {lang: re.compile(pattern) for lang, pattern in LANGUAGES.items()}

# language names and the ecosystem words that give the answer away; (pattern, case-sensitive)
_MASKED = [
    (r"c?python\s?[23](?:\.\d+)?|c?python|py[23]|pypi|pip", False),
    (r"haskell|ghc|hackage|cabal", False),
    (r"gnu\s+r|cran|bioconductor|bioc|r-cran", False), (r"R", True),
    (r"ruby|rubygems?|gems?", False),
    (r"golang", False), (r"Go|GO", True),
    (r"node\.?js|node|npm|javascript|ecmascript|typescript|js", False),
    (r"perl\s?[56]?|cpan", False),
    (r"rustc?|crates?|cargo", False),
]
_MASK_RE = [re.compile(rf"(?<![\w.])(?:{p})(?!\w)", 0 if case else re.IGNORECASE) for p, case in _MASKED]
_PARENTHESIS_RE = re.compile(r"\s*\(([^()]*)\)$")


def _strip_suffix(text: str) -> str:
    for sep in (" - ", " -- ", " — ", "; "):
        head, found, tail = text.rpartition(sep)
        if found and head.strip() and (len(tail.split()) <= 4 or tail.startswith("feature ")):
            return head
    m = _PARENTHESIS_RE.search(text)
    if m and m.start() > 0 and len(m.group(1).split()) <= 4:
        return text[:m.start()]
    return text


def clean_description(text: str) -> str:
    """A short description without the packaging qualifiers Debian appends to a package family
    (``- Rust source code``, ``- feature "std"``, ``; documentation``, ``(Python 3)``): a
    trailing part of at most four words (or a cargo ``feature ...`` list) after `` - ``, ``;``
    or in parentheses."""
    text = " ".join(text.split())
    for _ in range(3):
        stripped = _strip_suffix(text).rstrip(" .,:;-")
        if stripped == text:
            break
        text = stripped
    return text


def mask_languages(text: str) -> str:
    """Replace language names (Python, Go, GNU R...) and their package tools (pip, gem, npm,
    CPAN, cargo...) by ``[MASK]``."""
    for pattern in _MASK_RE:
        text = pattern.sub(MASK, text)
    return text


def package_language(name: str) -> str | None:
    """The language of a library package, from its name (``python3-numpy`` → python), or None."""
    for lang, pattern in _LANGUAGE_RE.items():
        if pattern.fullmatch(name):
            return lang
    return None


def build_package_section(src: Sources) -> dict[str, Examples]:
    items = []
    for r in packages(src):
        section = r.get("Section", "").rsplit("/", 1)[-1]  # contrib/games -> games
        if section in SECTIONS:
            text = clean_description(r["Description"])
            items.append((text, SECTIONS.index(section), text))
    return split_examples("package_section", items, len(SECTIONS))


def build_package_language(src: Sources) -> dict[str, Examples]:
    names = list(LANGUAGES)
    items = []
    for r in packages(src):
        lang = package_language(r["Package"])
        if lang is not None:
            text = mask_languages(clean_description(r["Description"]))
            if text.replace(MASK, "").strip(" .,-;:()"):
                items.append((text, names.index(lang), text))
    return split_examples("package_language", items, len(names))


# --------------------------------------------------------------------------- WordNet


# lexicographer file numbers (wordnet-base's lexnames(5WN))
NOUN_FILES = {"noun.act": 4, "noun.animal": 5, "noun.artifact": 6, "noun.body": 8, "noun.communication": 10,
              "noun.food": 13, "noun.person": 18, "noun.plant": 20}
VERB_FILES = {"verb.body": 29, "verb.change": 30, "verb.cognition": 31, "verb.communication": 32,
              "verb.contact": 35, "verb.motion": 38, "verb.possession": 40, "verb.social": 41}


def read_wordnet(path: Path) -> list[tuple[int, str]]:
    """``(lexicographer file number, definition)`` of each synset of a WordNet ``data.*`` file;
    the definition is the gloss without its quoted examples."""
    if not path.is_file():
        raise DatasetUnavailable(f"WordNet file {path} not found: install the Debian package wordnet-base; "
                                 f"{INSTALL_HINT}")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:  # the licence header
                continue
            fields, _, gloss = line.partition("|")
            definition = gloss.strip().split('; "')[0].strip(" ;")
            out.append((int(fields.split()[1]), definition))
    return out


def _build_wordnet(task: str, part: str, files: dict[str, int]) -> Callable[[Sources], dict[str, Examples]]:
    def build(src: Sources) -> dict[str, Examples]:
        index = {num: i for i, num in enumerate(files.values())}
        items = [(d, index[num], d) for num, d in read_wordnet(src.wordnet / f"data.{part}") if num in index]
        return split_examples(task, items, len(files))
    return build


# --------------------------------------------------------------------------- King James Bible

# book abbreviations as `bible` prints them, by group
BOOK_GROUPS = {
    "law": "Ge Exo Lev Num Deu",
    "history": "Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est",
    "wisdom": "Job Psa Prv Eccl SSol",
    "major_prophets": "Isa Jer Lam Eze Dan",
    "minor_prophets": "Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal",
    "gospels_acts": "Mat Mark Luke John Acts",
    "pauline_epistles": "Rom 1Cor 2Cor Gal Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn",
    "general_epistles_revelation": "Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev",
}
_BOOK_GROUP = {book: i for i, books in enumerate(BOOK_GROUPS.values()) for book in books.split()}
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def read_kjv(path: Path) -> list[tuple[str, int, str]]:
    """``(book, chapter, text)`` of each verse of ``bible -f`` output (``Ge1:1 In the beginning...``)."""
    verses = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _VERSE.match(line.strip())
        if m:
            verses.append((m.group(1), int(m.group(2)), m.group(4)))
    return verses


def build_kjv_books(src: Sources) -> dict[str, Examples]:
    path = _generated(src.kjv, ["bible", "-f", "Gen1:1-Rev22:21"], "the Debian package bible-kjv", src.generate)
    verses = read_kjv(path)
    unknown = sorted({b for b, _, _ in verses} - set(_BOOK_GROUP))
    if unknown or not verses:
        raise DatasetUnavailable(f"{path}: unexpected book names {unknown[:5]} or no verses; delete it and rerun")
    items = [(text, _BOOK_GROUP[book], f"{book}{chapter}") for book, chapter, text in verses]
    return split_examples("kjv_books", items, len(BOOK_GROUPS), SplitPlan(cap=(2000, 100, 250)))


# --------------------------------------------------------------------------- fortunes

# fortune file: the Debian package that ships it
FORTUNE_TOPICS = {"art": "fortunes", "computers": "fortunes", "food": "fortunes", "law": "fortunes",
                  "men-women": "fortunes", "politics": "fortunes", "science": "fortunes", "work": "fortunes"}
FORTUNE_COLLECTIONS = {"anarchism": "fortune-anarchism", "bofh-excuses": "fortunes-bofh-excuses",
                       "definitions": "fortunes", "literature": "fortunes", "people": "fortunes",
                       "songs-poems": "fortunes", "startrek": "fortunes", "zippy": "fortunes"}


def _build_fortunes(task: str, files: dict[str, str]) -> Callable[[Sources], dict[str, Examples]]:
    def build(src: Sources) -> dict[str, Examples]:
        items = []
        for label, (name, package) in enumerate(files.items()):
            path = src.fortunes / name
            if not path.is_file():
                raise DatasetUnavailable(f"fortune file {path} not found: install the Debian package {package}; "
                                         f"{INSTALL_HINT}")
            items += [(q, label, q) for q in read_fortunes(path)]
        # few quotes per file: a larger test share, so the test split reaches ~1000 quotes
        return split_examples(task, items, len(files), SplitPlan(test=0.3, val=0.1, cap=(2000, 60, 300)))
    return build


# --------------------------------------------------------------------------- word lists

# language: (word list under /usr/share/dict, Debian package)
WORD_LISTS = {"english": ("american-english", "wamerican"), "french": ("french", "wfrench"),
              "german": ("ngerman", "wngerman"), "spanish": ("spanish", "wspanish"),
              "italian": ("italian", "witalian"), "portuguese": ("portuguese", "wportuguese"),
              "dutch": ("dutch", "wdutch"), "swedish": ("swedish", "wswedish")}
WORDS_PER_EXAMPLE = 4
WORD_EXAMPLES = {"train": 2000, "val": 100, "test": 250}  # per language


def build_word_language(src: Sources, per_class: dict[str, int] = WORD_EXAMPLES) -> dict[str, Examples]:
    """Each split draws its examples from its own third of every list (by a hash of the word),
    so test words were never seen in training; words in two lists are dropped."""
    vocab = {}
    for lang, (name, package) in WORD_LISTS.items():
        path = src.dict / name
        if not path.is_file():
            raise DatasetUnavailable(f"word list {path} not found: install the Debian package {package}; "
                                     f"{INSTALL_HINT}")
        vocab[lang] = read_words(path)
    seen = collections.Counter(itertools.chain.from_iterable(vocab.values()))
    pools = {lang: {split: [] for split in SPLITS} for lang in vocab}
    for lang, words in vocab.items():
        for w in words:
            if seen[w] == 1:
                pools[lang][_word_split(w)].append(w)
    out = {}
    for split in SPLITS:
        texts, labels = [], []
        for label, lang in enumerate(vocab):
            pool = pools[lang][split]
            if len(pool) < WORDS_PER_EXAMPLE:
                raise DatasetUnavailable(f"word list of {lang} has too few words ({len(pool)}) for the {split} split")
            rng = random.Random(f"word_language/{split}/{lang}")
            for _ in range(per_class[split]):
                texts.append(" ".join(rng.sample(pool, WORDS_PER_EXAMPLE)))
                labels.append(label)
        out[split] = Examples(texts, labels)
    return out


def _word_split(word: str) -> str:
    """train / val / test for a word: 70 / 10 / 20% by a CRC-32 of its UTF-8 bytes (fast and
    the same everywhere; there are two million words)."""
    u = zlib.crc32(word.encode()) / 2 ** 32
    return "test" if u < 0.2 else "val" if u < 0.3 else "train"


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TextTaskSpec:
    name: str
    classes: tuple[str, ...]
    description: str
    packages: str  # the Debian packages it reads
    build: Callable[[Sources], dict[str, Examples]]


TASKS: dict[str, TextTaskSpec] = {t.name: t for t in [
    TextTaskSpec("package_section", SECTIONS, "Debian package short description → archive section",
                 "apt lists (apt-get update)", build_package_section),
    TextTaskSpec("package_language", tuple(LANGUAGES),
                 "library package description → programming language (names masked)",
                 "apt lists (apt-get update)", build_package_language),
    TextTaskSpec("wordnet_noun", tuple(NOUN_FILES), "WordNet noun definition → lexicographer file",
                 "wordnet-base", _build_wordnet("wordnet_noun", "noun", NOUN_FILES)),
    TextTaskSpec("wordnet_verb", tuple(VERB_FILES), "WordNet verb definition → lexicographer file",
                 "wordnet-base", _build_wordnet("wordnet_verb", "verb", VERB_FILES)),
    TextTaskSpec("kjv_books", tuple(BOOK_GROUPS), "King James Bible verse → group of books",
                 "bible-kjv", build_kjv_books),
    TextTaskSpec("fortune_topic", tuple(FORTUNE_TOPICS), "quote → topical fortune file",
                 "fortunes", _build_fortunes("fortune_topic", FORTUNE_TOPICS)),
    TextTaskSpec("fortune_collection", tuple(FORTUNE_COLLECTIONS), "quote → fortune collection (style)",
                 "fortunes fortune-anarchism fortunes-bofh-excuses",
                 _build_fortunes("fortune_collection", FORTUNE_COLLECTIONS)),
    TextTaskSpec("word_language", tuple(WORD_LISTS), f"{WORDS_PER_EXAMPLE} random words → language of the word list",
                 " ".join(p for _, p in WORD_LISTS.values()), build_word_language),
]}

_BUILT: dict[tuple[str, Sources], dict[str, Examples]] = {}


def task_splits(name: str) -> dict[str, Examples]:
    """Train/val/test examples of task ``name``, memoised per sources."""
    src = sources()
    if (name, src) not in _BUILT:
        splits = TASKS[name].build(src)
        for split, ex in splits.items():
            if len(set(ex.labels)) < len(TASKS[name].classes):
                missing = sorted(set(range(len(TASKS[name].classes))) - set(ex.labels))
                raise DatasetUnavailable(f"task {name}: no {split} examples of class(es) "
                                         f"{[TASKS[name].classes[i] for i in missing]} (is {TASKS[name].packages} "
                                         f"complete?)")
        _BUILT[name, src] = splits
    return _BUILT[name, src]
