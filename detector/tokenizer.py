"""Train a DeBERTa-v3-style Unigram tokenizer locally, for backbones that have no tokenizer of their own."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, DebertaV2Tokenizer, PreTrainedTokenizerBase

from detector.atomic import new_dir

# DeBERTa-v3 puts these at ids 0..3; [MASK] follows them here because the vocab is trained, not fixed.
SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
# Lightning stores a data module's state_dict() in the checkpoint under the class name.
DATAMODULE_STATE = "DetectorDataModule"
SCORE_DECIMALS = 6  # far coarser than the trainer's run-to-run float noise (~1e-14)
PENALTY_STEP = 1e-4  # the Unigram trainer's score step between the "required" characters it adds


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000) -> DebertaV2Tokenizer:
    """Train a SentencePiece-style Unigram vocab on ``texts`` and wrap it as a ``DebertaV2Tokenizer``.

    The result round-trips through ``save_pretrained``/``AutoTokenizer.from_pretrained``. It is built
    from the Unigram vocab itself: ``DebertaV2Tokenizer(vocab_file="spm.model")`` would silently
    yield a 7-token vocab in transformers 5.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    raw = Tokenizer(models.Unigram())
    raw.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="[UNK]", show_progress=False
    )
    raw.train_from_iterator(texts, trainer)
    model = json.loads(raw.to_str())["model"]
    pieces = [(str(piece), float(score)) for piece, score in model["vocab"]]
    unk_piece = pieces[int(model["unk_id"])][0]
    specials = [entry for entry in pieces if entry[0] in SPECIAL_TOKENS]
    rest = canonical_scores([entry for entry in pieces if entry[0] not in SPECIAL_TOKENS])
    vocab = specials + rest
    return DebertaV2Tokenizer(vocab=vocab, unk_id=[piece for piece, _ in vocab].index(unk_piece))


def canonical_scores(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The trained pieces sorted by text, with scores that do not depend on the trainer's hash order.

    The Unigram trainer varies from run to run in two ways (its hash maps are seeded at random): the
    low bits of the scores (float sums in another order), and which of the "required" characters it
    adds gets which score: the lowest score plus 0, 1, 2, ... ``PENALTY_STEP``, in hash order. Scores
    are rounded to ``SCORE_DECIMALS``, and the single characters on that grid share its scores out
    in order of their text, so the same texts give the same tokenizer, byte for byte.
    """
    rounded = [(piece, round(score, SCORE_DECIMALS)) for piece, score in pieces]
    if not rounded:
        return rounded
    low = min(score for _, score in rounded)
    singles = sum(len(piece) == 1 for piece, _ in rounded)

    def on_grid(score: float) -> bool:
        steps = round((score - low) / PENALTY_STEP)
        return steps <= singles and abs(score - low - steps * PENALTY_STEP) < 10 ** -(SCORE_DECIMALS - 1)

    grid = sorted(piece for piece, score in rounded if len(piece) == 1 and on_grid(score))
    scores = sorted(score for piece, score in rounded if len(piece) == 1 and on_grid(score))
    shared = dict(zip(grid, scores, strict=True))
    return sorted(((piece, shared.get(piece, score)) for piece, score in rounded), key=lambda e: e[0])


def load_or_train_tokenizer(
    folder: str | Path, texts: Iterable[str], vocab_size: int = 8000
) -> PreTrainedTokenizerBase:
    """Reuse the tokenizer saved in ``folder`` if there is one, else train one on ``texts`` and save it."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = train_tokenizer(texts, vocab_size)
    _commit_folder(folder, tokenizer.save_pretrained)
    return tokenizer


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The tokenizer's saved files as ``{file name: text}``, to carry inside a checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_text(encoding="utf-8") for path in sorted(Path(folder).iterdir())}


def tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase:
    """Rebuild a tokenizer from :func:`tokenizer_files` output."""
    if "tokenizer_config.json" not in files:
        raise ValueError(f"no tokenizer_config.json among the tokenizer files {sorted(files)}")
    with tempfile.TemporaryDirectory() as folder:
        _write_files(files, Path(folder))
        return AutoTokenizer.from_pretrained(folder)


def checkpoint_tokenizer_files(checkpoint: Mapping[str, Any]) -> dict[str, str] | None:
    """The tokenizer files ``DetectorDataModule`` stored in a checkpoint, or None when it holds none.

    Args:
        checkpoint: a loaded checkpoint dict, or the ``state`` of its header
            (:func:`detector.checkpoint.format.read_header`), which holds them without reading any tensor.
    """
    state = checkpoint.get(DATAMODULE_STATE) or {}
    return dict(state["tokenizer_files"]) if state.get("tokenizer_files") else None


def checkpoint_tokenizer(checkpoint: Mapping[str, Any], path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer a checkpoint was trained with, rebuilt from the files stored in it.

    Needs no tokenizer folder, training file or hub access: a checkpoint alone is enough.

    Args:
        checkpoint: a loaded checkpoint dict or its header's ``state``.
        path: the checkpoint file, named in the error.

    Raises:
        ValueError: the checkpoint holds no tokenizer files.
    """
    files = checkpoint_tokenizer_files(checkpoint)
    if files is None:
        raise ValueError(
            f"checkpoint {path} holds no tokenizer files ({DATAMODULE_STATE}.tokenizer_files): "
            "it was not written by a run with DetectorDataModule"
        )
    return tokenizer_from_files(files)


def save_tokenizer_files(files: dict[str, str], folder: str | Path) -> Path:
    """Write :func:`tokenizer_files` output into ``folder`` (kept if it already exists), atomically."""
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file():
        _commit_folder(folder, partial(_write_files, files))
    return folder


def _write_files(files: dict[str, str], folder: Path) -> None:
    for name, text in files.items():
        (Path(folder) / Path(name).name).write_text(text, encoding="utf-8")


def _commit_folder(folder: Path, fill: Callable[[Path], Any]) -> None:
    """Fill a new ``folder`` atomically (:func:`detector.atomic.new_dir`); another process's is kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A concurrent run (another rank) that committed it first wins; its files are the same.
    with contextlib.suppress(FileExistsError), new_dir(folder) as staging:
        fill(staging)
