"""Corpora: sources, the byte split, token shards, the cache's reuse and rebuilds, kill safety, the
BPE recipe, and one clear line for each kind of bad input."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, gptzoo_cli, gptzoo_in_process, set_args
from test_cli import assert_one_line_error

from gptzoo.data import corpus as corpus_module
from gptzoo.data import prepare_corpus, shards, sources, train_bpe
from gptzoo.errors import GptzooError
from gptzoo.recipe import DataConfig

RECIPE = ROOT / "recipes" / "char_shakespeare.py"
BPE_RECIPE = ROOT / "recipes" / "bpe_shakespeare.py"


def prepare(*overrides: str):
    return gptzoo_in_process("prepare", RECIPE, *[a for o in overrides for a in ("--set", o)])


def decode_split(corpus, split) -> str:
    return corpus.tokenizer.decode(split[0:len(split)])


def test_a_file_splits_by_bytes_into_shards_that_round_trip(tmp_path, monkeypatch):
    text = "First Citizen:\nBefore we proceed, hear me. ñ é 🙂 日本語\n" * 40 + "no newline " * 30
    path = tmp_path / "a.txt"
    path.write_text(text)
    # Tiny pieces and shards, so pieces are cut and windows cross shard files.
    monkeypatch.setattr(sources, "PIECE_BYTES", 50)
    monkeypatch.setattr(shards, "SHARD_TOKENS", 97)
    cfg = DataConfig(path=str(path), tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    corpus = prepare_corpus(cfg, log=lambda _: None)
    assert len(corpus.train.maps) > 3 and corpus.manifest["dtype"] == "uint16"
    data = text.encode()
    cut = int(len(data) * 0.9)
    assert data[cut] & 0xC0 != 0x80 or len(corpus.train) > cut  # moved off a continuation byte
    assert decode_split(corpus, corpus.train) + decode_split(corpus, corpus.val) == text
    assert abs(len(corpus.train) - cut) < 4 and corpus.val.n_bytes == len(corpus.val)
    flat = np.frombuffer(data, np.uint8)
    starts = np.array([0, 90, 96, 97, 150, len(corpus.train) - 40])
    np.testing.assert_array_equal(corpus.train.windows(starts, 40),
                                  flat[starts[:, None] + np.arange(40)])
    # A cut inside a character moves past it: the whole character stays in training.
    emoji = ("line of text\n" * 70)[:898] + "🙂" + "b" * 98  # 1,000 bytes: byte 900 is inside
    path.write_text(emoji)
    corpus = prepare_corpus(cfg, log=lambda _: None)
    assert decode_split(corpus, corpus.train).endswith("🙂") and len(corpus.train) == 902
    assert decode_split(corpus, corpus.val) == "b" * 98
    shard = np.fromfile(corpus.folder / corpus.manifest["splits"]["train"]["shards"][0]["file"],
                        dtype=np.uint16)
    assert len(shard) == 97  # two bytes a token on disk
    # A line longer than a piece is cut between characters, not inside one.
    long_line = "a" + "é" * 200 + "\n"
    path.write_text(long_line)
    corpus = prepare_corpus(cfg, log=lambda _: None)
    assert decode_split(corpus, corpus.train) + decode_split(corpus, corpus.val) == long_line


def test_char_split_is_the_old_token_split_and_documents_join_with_end_of_text(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    corpus = prepare_corpus(DataConfig(path=str(tmp_path / "one.txt"),
                                       cache_dir=str(tmp_path / "c")), log=lambda _: None)
    assert decode_split(corpus, corpus.train) == text[:900]
    assert decode_split(corpus, corpus.val) == text[900:] and corpus.val.bytes_per_token == 1.0

    records = [{"body": f"document {i} é " + "words " * i} for i in range(30)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    corpus = prepare_corpus(DataConfig(path=str(jsonl), tokenizer="bpe", vocab_size=300,
                                       text_field="body", cache_dir=str(tmp_path / "c")),
                            log=lambda _: None)
    both = decode_split(corpus, corpus.train) + "<|endoftext|>" + decode_split(corpus, corpus.val)
    assert both == "<|endoftext|>".join(r["body"] for r in records)
    n_bytes = sum(len(r["body"].encode()) for r in records)
    assert corpus.train.n_bytes + corpus.val.n_bytes == n_bytes
    assert 257 < corpus.manifest["vocab_size"] <= 300  # fewer when the text runs out of pairs


def test_a_bpe_learns_from_pieces_spread_evenly_through_the_training_split(tmp_path, monkeypatch):
    """A big corpus trains its BPE on a sample: every k-th training piece, never validation text.
    Each piece here is one document of a word that only it contains, so the vocabulary shows
    which pieces the BPE saw."""
    names = [f"{chr(ord('a') + i)}{chr(ord('a') + i)}{chr(ord('a') + i)}" for i in range(20)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, name in enumerate(names):  # 20 documents of 1,000 bytes: 18 train, 2 validate
        (folder / f"{i:02d}.txt").write_text((name + " ") * 250)
    monkeypatch.setattr(corpus_module, "BPE_SAMPLE_BYTES", 6_000)  # every third piece of 18,000
    corpus = prepare_corpus(DataConfig(path=str(folder), tokenizer="bpe", vocab_size=400,
                                       cache_dir=str(tmp_path / "c")), log=lambda _: None)
    vocab = corpus.tokenizer.tokenizer.get_vocab()
    learned = [name for name in names if name in vocab or "\u0120" + name in vocab]
    assert learned == names[0:18:3]


def test_folder_and_glob_sources_skip_hidden_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "sub" / "a.txt").write_text("ay")
    (folder / ".hidden").write_text("no")
    found = [Path(s["path"]).name for s in sources.find_sources(DataConfig(path=str(folder)))]
    assert found == ["b.txt", "a.txt"]  # sorted by path: corpus/b.txt < corpus/sub/a.txt
    pattern = DataConfig(path=str(folder / "**" / "*.txt"))
    assert len(sources.find_sources(pattern)) == 2


def test_the_cache_is_reused_and_rebuilt_when_sources_or_tokenizer_change(tmp_path, small_text):
    data = tmp_path / "data.txt"
    data.write_text(small_text.read_text())
    first = prepare(f"data.path={data}")
    assert first.returncode == 0 and "prepared" in first.stdout, first.stderr
    folder = Path(re.search(r"cache (\S+)", first.stdout).group(1))
    again = prepare(f"data.path={data}")
    assert again.stdout == first.stdout.split("\n", 1)[1]  # all but the "prepared" line
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))  # touch
    assert "prepared" in prepare(f"data.path={data}").stdout

    tokenizer = tmp_path / "tokenizer.json"
    train_bpe(iter([small_text.read_text()]), 300).save(tmp_path)
    with_file = prepare(f"data.path={data}", f"data.tokenizer={tokenizer}")
    assert "prepared" in with_file.stdout and "300 tokens" in with_file.stdout
    assert "prepared" not in prepare(f"data.path={data}", f"data.tokenizer={tokenizer}").stdout
    train_bpe(iter([small_text.read_text()]), 320).save(tmp_path)  # same path, new tokenizer
    rebuilt = prepare(f"data.path={data}", f"data.tokenizer={tokenizer}")
    assert "prepared" in rebuilt.stdout and "320 tokens" in rebuilt.stdout
    assert folder.is_dir() and "manifest.json" in os.listdir(folder)


def test_a_killed_prepare_leaves_nothing_trusted(tmp_path, small_text, monkeypatch):
    cfg = DataConfig(path=str(small_text), cache_dir=str(tmp_path / "cache"))
    folder = corpus_module.cache_folder(cfg)
    # What SIGKILL leaves: a temporary folder of a dead process, shards and all.
    abandoned = folder.with_name(f"{folder.name}.tmp-{2**22 + 12345}-x")
    abandoned.mkdir(parents=True)
    (abandoned / "train_00000.bin").write_bytes(b"\0" * 10)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_module, "write_shards", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(cfg, log=lambda _: None)
    assert not folder.exists() and not abandoned.exists()
    assert list(folder.parent.iterdir()) == []  # the interrupted build removed its own folder
    monkeypatch.undo()
    corpus = prepare_corpus(cfg, log=lambda _: None)
    (folder / "manifest.json").unlink()  # a cache without its manifest is never trusted
    logged = []
    assert prepare_corpus(cfg, log=logged.append).manifest["splits"] == corpus.manifest["splits"]
    assert logged and logged[0].startswith("prepared")


def test_shard_dtype_follows_the_vocabulary():
    assert shards.shard_dtype(65_536) == np.uint16
    assert shards.shard_dtype(65_537) == np.uint32
    with pytest.raises(GptzooError, match="does not fit uint32 token shards"):
        shards.shard_dtype(2**32 + 1)


def test_a_large_vocabulary_gets_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "data.txt").write_text(" ".join(f"w{i * 997 % 70_000}" for i in range(3000)))
    corpus = prepare_corpus(DataConfig(path=str(tmp_path / "data.txt"),
                                       tokenizer=str(tmp_path / "tokenizer.json"),
                                       cache_dir=str(tmp_path / "c")), log=lambda _: None)
    assert corpus.manifest["dtype"] == "uint32" and corpus.train[0:3].tolist() == [0, 997, 1994]


def test_a_folder_of_files_trains_evaluates_and_samples_through_the_cli(tmp_path, small_text):
    folder = tmp_path / "plays"
    (folder / "act2").mkdir(parents=True)
    text = small_text.read_text()
    for i, part in enumerate(range(0, len(text), 5000)):
        (folder / ("act2" if i % 2 else "") / f"part{i}.txt").write_text(text[part:part + 5000])
    run_dir = tmp_path / "run"
    gptzoo_cli("train", RECIPE, *set_args({**TINY, "trainer.max_steps": "10",
                                           "data.path": str(folder)}),
               "--run-dir", run_dir, check=True)
    assert (run_dir / "tokenizer.json").is_file()
    out = gptzoo_cli("eval", "--ckpt", run_dir, check=True).stdout
    per_token, per_byte = map(float, re.search(r"([0-9.]+) bits per token \| ([0-9.]+) bits per "
                                               r"byte", out).groups())
    assert per_token == per_byte  # ASCII characters: one byte a token
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert records[-1]["val_bpb"] == pytest.approx(records[-1]["val_loss"] / np.log(2))
    assert gptzoo_cli("sample", "--ckpt", run_dir, "--max-new-tokens", "5").returncode == 0


def test_bpe_recipe_trains_and_samples_through_the_cli(tmp_path, small_text):
    run_dir = tmp_path / "bpe"
    overrides = {**TINY, "trainer.max_steps": "10", "data.path": str(small_text),
                 "data.vocab_size": "300", "model.block_size": "16"}
    gptzoo_cli("train", BPE_RECIPE, *set_args(overrides), "--run-dir", run_dir, check=True)
    saved = json.loads((run_dir / "tokenizer.json").read_text())
    assert saved["model"]["type"] == "BPE" and len(saved["model"]["vocab"]) == 300
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    # BPE tokens cover more than a byte each: fewer bits per byte than per token.
    assert records[-1]["val_bpb"] < records[-1]["val_loss"] / np.log(2)
    out = gptzoo_cli("sample", "--ckpt", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "20",
                     check=True).stdout
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:") + 1
    assert gptzoo_cli("sample", "--ckpt", run_dir, "--max-new-tokens", "5").returncode == 0


def test_bad_corpora_are_one_line_naming_the_culprit(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 au lait " * 3)
    assert_one_line_error(prepare(f"data.path={latin1}"), str(latin1), "not UTF-8", "byte 3",
                          "iconv")
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    assert_one_line_error(prepare(f"data.path={empty_folder}"), str(empty_folder), "no files")
    assert_one_line_error(prepare(f"data.path={tmp_path}/*.md"), "matches no files")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    assert_one_line_error(prepare(f"data.path={bad_json}"), str(bad_json), "line 3 is not JSON")
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "fine"}\n{"content": "x"}\n')
    assert_one_line_error(prepare(f"data.path={no_field}"), str(no_field), "line 2",
                          "'text'", "content", "data.text_field")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question. " * 5)
    n_train = int(len(short.read_text()) * 0.9)
    assert_one_line_error(gptzoo_in_process("train", RECIPE, *set_args({**TINY,
                                                                         "data.path": str(short)})),
                          str(short), "training split", f"has {n_train} tokens",
                          "trainer.batch_size x model.block_size + 1 = 8 x 32 + 1) = 257")
    unreadable = tmp_path / "tokenizer.json"
    unreadable.write_text("{not json")
    assert_one_line_error(prepare(f"data.path={short}", f"data.tokenizer={unreadable}"),
                          str(unreadable), "not a readable")


def test_resuming_with_another_tokenizer_or_changed_text_is_refused(tmp_path, small_text):
    run_dir, data = tmp_path / "run", tmp_path / "data.txt"
    data.write_text(small_text.read_text())
    args = ["train", RECIPE, *set_args({**TINY, "trainer.max_steps": "5",
                                        "data.path": str(data)}), "--run-dir", run_dir]
    gptzoo_cli(*args, check=True)
    assert_one_line_error(gptzoo_in_process(*args, "--resume", "--set", "data.tokenizer=bytes"),
                          "tokenizer", "differs from the checkpoint's", "data.tokenizer")
    with data.open("a") as f:  # the same characters: the tokenizer alone would not tell
        f.write(small_text.read_text()[:3000])
    assert_one_line_error(gptzoo_in_process(*args, "--resume"),
                          "the corpus (data.path) changed", f"--init-from {run_dir}")


def test_a_corpus_tokenized_for_another_run_does_not_replace_the_fitted_one(tmp_path,
                                                                          small_text):
    """`--init-from` tokenizes the corpus with another run's tokenizer; a later run that fits
    its own still gets the BPE fitted to this text."""
    cfg = DataConfig(path=str(small_text), tokenizer="bpe", vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    first = prepare_corpus(cfg, log=lambda _: None)
    fitted = first.tokenizer
    # The run's own tokenizer forced again (its eval, its resume) reads the same shards.
    assert prepare_corpus(cfg, fitted, log=lambda _: None).folder == first.folder
    other = train_bpe(iter(["a different text, " * 500]), 280)
    assert prepare_corpus(cfg, other, log=lambda _: None).tokenizer.to_dict() == other.to_dict()
    again = prepare_corpus(cfg, log=lambda _: None).tokenizer
    assert again.to_dict() == fitted.to_dict()
