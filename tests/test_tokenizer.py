import pytest
from transformers import AutoTokenizer, DebertaV2Tokenizer

from detector.tokenizer import (
    SPECIAL_TOKENS,
    load_or_train_tokenizer,
    tokenizer_files,
    tokenizer_from_files,
    train_tokenizer,
)


def test_trained_tokenizer_round_trips_through_save_and_auto(tmp_path, texts):
    tokenizer = train_tokenizer(texts, vocab_size=300)
    assert isinstance(tokenizer, DebertaV2Tokenizer)
    assert tokenizer.vocab_size > 100  # a real vocab, not the 7-token fallback of vocab_file=spm.model
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[:4]] == [0, 1, 2, 3]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = texts[:5]
    assert reloaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    ids = tokenizer(sample[0])["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert reloaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)


def test_load_or_train_reuses_a_saved_tokenizer(tmp_path, texts):
    first = load_or_train_tokenizer(tmp_path / "tok", texts, vocab_size=300)
    # Different texts would give a different vocab: reuse means the saved one comes back.
    second = load_or_train_tokenizer(tmp_path / "tok", ["completely other words"] * 10, vocab_size=300)
    assert second.get_vocab() == first.get_vocab()


def test_tokenizer_travels_as_files(texts):
    tokenizer = train_tokenizer(texts, vocab_size=300)
    files = tokenizer_files(tokenizer)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    rebuilt = tokenizer_from_files(files)
    assert rebuilt(texts[:3])["input_ids"] == tokenizer(texts[:3])["input_ids"]


def test_saved_tokenizer_folders_are_committed_through_new_dir(tmp_path, texts, monkeypatch):
    from detector import atomic
    from detector.tokenizer import load_or_train_tokenizer, save_tokenizer_files, tokenizer_files

    committed = []
    real = atomic.fsync_tree
    monkeypatch.setattr(atomic, "fsync_tree", lambda folder: (committed.append(folder.name), real(folder)))
    tokenizer = load_or_train_tokenizer(tmp_path / "trained", texts, vocab_size=300)
    save_tokenizer_files(tokenizer_files(tokenizer), tmp_path / "copy")
    assert [name.split(atomic.TEMP_MARKER)[0] for name in committed] == [".trained", ".copy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "trained"]
    assert (tmp_path / "copy" / "tokenizer.json").read_text() == (
        tmp_path / "trained" / "tokenizer.json"
    ).read_text()


@pytest.mark.parametrize("vocab_size", [200, 300])
def test_training_twice_on_the_same_texts_gives_byte_identical_tokenizers(tmp_path, texts, vocab_size):
    # Rare characters make the trainer append "required" pieces in its (randomly seeded) hash order.
    corpus = [*texts, "$5 + 3 = 8", "Quiz: 90° ^ zero \u2212 one", "q Z"] * 2
    saved = []
    for run in range(4):
        train_tokenizer(corpus, vocab_size=vocab_size).save_pretrained(tmp_path / str(run))
        saved.append((tmp_path / str(run) / "tokenizer.json").read_bytes())
    assert saved[1:] == saved[:1] * 3
