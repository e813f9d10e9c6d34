"""DetectorDataModule: labelled text files in, tokenized, dynamically padded, resumable batches out."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from detector.backbone import has_own_tokenizer, resolve_pretrained
from detector.demo import write_demo_corpus
from detector.loader import ResumableDataLoader, ResumableSampler
from detector.records import Records, read_records
from detector.scoring import ID2LABEL
from detector.splits import stratified_group_split
from detector.tokenizer import load_or_train_tokenizer, tokenizer_files

DEFAULT_ROOT = "outputs"  # where a run's files go without the CLI's `trainer.default_root_dir`


def warn_single_class(records: Records) -> None:
    """Warn when a training file holds one class only: the classifier can learn nothing but a constant."""
    present = {label for label in records.label if label is not None}
    if len(present) == 1:
        name = ID2LABEL[present.pop()]
        rank_zero_warn(
            f"{records.path}: every one of the {len(records)} training rows is labelled {name!r}; "
            "a classifier trained on one class only learns a constant answer. Add rows of the other class."
        )


class EncodedDataset(Dataset):
    """Token ids and labels of one split; items carry their row index so predictions map back."""

    def __init__(self, input_ids: list[list[int]], labels: list[int | None]) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "label": self.labels[index], "index": index}


def pad_batch(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (dynamic padding)."""
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids = item["input_ids"]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }
    if all(item["label"] is not None for item in items):
        batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
    return batch


class DetectorDataModule(LightningDataModule):
    """Reads JSONL/CSV/Parquet files with ``text`` and ``label`` (0/1 or human/machine).

    Args:
        train_path: training file; ``None`` writes and uses the synthetic demo corpus in ``demo_dir``.
        val_path: validation file; ``None`` splits ``val_fraction`` of the training groups off, seeded,
            stratified by label and respecting the optional ``group`` column.
        test_path: test file (``None``: the demo corpus's test split when training on the demo).
        predict_path: file to score with ``predict``; labels optional.
        pretrained: the backbone's hub id or folder, whose tokenizer is used when it has one
            (linked from ``model.pretrained`` by the CLI).
        tokenizer_path: a folder holding a saved tokenizer to use as is; the CLI fills it from the
            checkpoint when given ``--ckpt_path``, so a checkpoint is resumed, tested or scored with
            the very tokenizer it was trained with.
        demo_dir: where the synthetic demo corpus is written (``None``: ``<root>/demo_data``).
        tokenizer_root: where a locally trained tokenizer is saved, one folder per training data
            fingerprint, and reused by later runs on the same data (``None``: ``<root>/tokenizer``).
            ``<root>`` is ``trainer.default_root_dir`` under the CLI, else ``outputs``.
        tokenizer_vocab_size: target vocabulary size of a locally trained tokenizer.
        max_length: truncation length in tokens.
        batch_size: training batch size.
        eval_batch_size: batch size of validation, test and predict; ``None``: twice ``batch_size``.
        val_fraction: share of the training groups split off for validation when ``val_path`` is ``None``.
        balance: class imbalance handling: ``loss_weights`` (inverse class frequency in the loss),
            ``sampler`` (balanced sampling with replacement), or ``none``.
        num_workers: DataLoader worker processes.
        seed: seed of the split and of the (resumable) batch order.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        pretrained: str | None = None,
        tokenizer_path: str | None = None,
        demo_dir: str | None = None,
        tokenizer_root: str | None = None,
        tokenizer_vocab_size: int = 8000,
        max_length: int = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        balance: Literal["none", "loss_weights", "sampler"] = "loss_weights",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self._train_records: Records | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        # Computed once per run: `state_dict` runs at every checkpoint save.
        self._fingerprint: str | None = None
        self._tokenizer_files: dict[str, str] | None = None
        self.datasets: dict[str, EncodedDataset] = {}
        self.records: dict[str, Records] = {}

    def _paths(self) -> dict[str, str | None]:
        h: Any = self.hparams
        if h.train_path is not None:
            return {"train": h.train_path, "val": h.val_path, "test": h.test_path, "predict": h.predict_path}
        demo = write_demo_corpus(h.demo_dir or f"{DEFAULT_ROOT}/demo_data", seed=0)
        test = h.test_path or str(demo["test"])
        return {
            "train": str(demo["train"]),
            "val": h.val_path or str(demo["val"]),
            "test": test,
            "predict": h.predict_path or test,
        }

    def train_records(self) -> Records:
        """The training file's rows (read once)."""
        if self._train_records is None:
            self._train_records = read_records(self._paths()["train"])  # type: ignore[arg-type]
        return self._train_records

    def data_fingerprint(self) -> str:
        """SHA-256 of the training file's bytes: identifies the data a tokenizer or model was trained on.

        Hashed once per data module (a run), not at every checkpoint save.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            with open(self._paths()["train"], "rb") as handle:  # type: ignore[arg-type]
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def tokenizer_files(self) -> dict[str, str]:
        """The tokenizer's saved files (:func:`detector.tokenizer.tokenizer_files`), serialised once."""
        if self._tokenizer_files is None:
            self._tokenizer_files = tokenizer_files(self.tokenizer)
        return dict(self._tokenizer_files)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The backbone's tokenizer, or one trained on the training texts and saved for reuse."""
        if self._tokenizer is None:
            h: Any = self.hparams
            pretrained = h.pretrained
            if h.tokenizer_path is not None:
                self._tokenizer = AutoTokenizer.from_pretrained(h.tokenizer_path)
            elif has_own_tokenizer(pretrained):
                self._tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(pretrained))
            else:
                name = f"{self.data_fingerprint()[:16]}-v{h.tokenizer_vocab_size}"
                folder = Path(self.tokenizer_root) / name
                self._tokenizer = load_or_train_tokenizer(
                    folder, self.train_records().text, h.tokenizer_vocab_size
                )
        return self._tokenizer

    @property
    def tokenizer_root(self) -> str:
        """Where locally trained tokenizers are saved."""
        return cast(Any, self.hparams).tokenizer_root or f"{DEFAULT_ROOT}/tokenizer"

    @property
    def max_length(self) -> int:
        """Truncation length in tokens: what the model is trained, validated and thresholded with."""
        return int(cast(Any, self.hparams).max_length)

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (the CLI links it to the model)."""
        return len(self.tokenizer)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoints carry the tokenizer's files, so a checkpoint alone can be scored or exported."""
        return {"tokenizer_files": self.tokenizer_files(), "data_fingerprint": self.data_fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that a resumed run tokenizes as the checkpoint's run did (data order: the loader's state)."""
        saved = state_dict.get("tokenizer_files", {}).get("tokenizer.json")
        if saved is not None and saved != self.tokenizer_files().get("tokenizer.json"):
            raise ValueError(
                "the checkpoint was trained with another tokenizer than this run's "
                f"(data.tokenizer_root={self.tokenizer_root!r}); resume with the run's "
                "own tokenizer_root, or export the checkpoint's tokenizer with `python -m detector export`"
            )

    def setup(self, stage: str) -> None:
        paths = self._paths()
        if stage in ("fit", "validate"):
            self._setup_fit(paths["val"])
        if stage == "test":
            self._set_split("test", self._read(paths["test"], "test_path"))
        if stage == "predict":
            self._set_split("predict", self._read(paths["predict"], "predict_path", require_label=False))

    def _read(self, path: str | None, option: str, require_label: bool = True) -> Records:
        if path is None:
            raise ValueError(f"data.{option} is not set")
        return read_records(path, require_label=require_label)

    def _setup_fit(self, val_path: str | None) -> None:
        records, h = self.train_records(), cast(Any, self.hparams)
        warn_single_class(records)
        if val_path is not None:
            self._set_split("train", records)
            self._set_split("val", read_records(val_path))
            return
        groups = records.extra.get("group")
        train, val = stratified_group_split(records.label, groups, h.val_fraction, h.seed)  # type: ignore[arg-type]
        self._set_split("train", records.subset(train))
        self._set_split("val", records.subset(val))

    def _set_split(self, split: str, records: Records) -> None:
        max_length = cast(Any, self.hparams).max_length
        encoded = self.tokenizer(records.text, truncation=True, max_length=max_length)
        self.records[split] = records
        self.datasets[split] = EncodedDataset(encoded["input_ids"], records.label)

    def class_weights(self) -> torch.Tensor | None:
        """Inverse-frequency loss weights when ``balance == "loss_weights"``, else ``None``."""
        if cast(Any, self.hparams).balance != "loss_weights":
            return None
        counts = torch.bincount(torch.tensor(self.datasets["train"].labels), minlength=2).double()
        return (counts.sum() / (2 * counts.clamp(min=1))).float()

    def _sampler(self, split: str, train: bool) -> ResumableSampler:
        dataset, h, trainer = self.datasets[split], cast(Any, self.hparams), self.trainer
        weights = None
        if train and h.balance == "sampler":
            counts = torch.bincount(torch.tensor(dataset.labels), minlength=2).double()
            weights = (1.0 / counts.clamp(min=1))[torch.tensor(dataset.labels)].tolist()
        return ResumableSampler(
            len(dataset), seed=h.seed, shuffle=train, weights=weights,
            rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1,
        )  # fmt: skip

    def _loader_options(self) -> dict[str, Any]:
        h: Any = self.hparams
        return {"collate_fn": partial(pad_batch, pad_id=self.tokenizer.pad_token_id or 0),
                "num_workers": h.num_workers, "persistent_workers": h.num_workers > 0}  # fmt: skip

    def _eval_loader(self, split: str) -> DataLoader:
        # Plain DataLoaders: evaluation needs no resume, and Lightning rebuilds them for `predict`.
        h: Any = self.hparams
        return DataLoader(
            self.datasets[split], sampler=self._sampler(split, train=False),
            batch_size=h.eval_batch_size or 2 * h.batch_size, generator=torch.Generator().manual_seed(h.seed),
            **self._loader_options(),
        )  # fmt: skip

    def train_dataloader(self) -> ResumableDataLoader:
        consumed = None
        if self.trainer is not None:
            # Lightning fetches a batch ahead: the loop's own count is the position to save.
            progress: Any = self.trainer.fit_loop.epoch_loop.batch_progress.current
            consumed = lambda: progress.processed  # noqa: E731
        batch_size = cast(Any, self.hparams).batch_size
        sampler = self._sampler("train", train=True)
        return ResumableDataLoader(self.datasets["train"], sampler, batch_size, consumed=consumed,
                                   **self._loader_options())  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")
