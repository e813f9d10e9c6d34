"""The errors the command line reports as one line and a non-zero exit, never as a traceback.

A refusal of bad input (a corrupt checkpoint or bundle, a bad data row, a full disk) already says
what is wrong and where; a traceback in front of it only hides that line. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from detector.backbone import PretrainedReferenceError
from detector.bundle.integrity import BundleIntegrityError
from detector.bundle.onnx import MissingExtraError
from detector.bundle.quantize import Int8CheckError
from detector.bundle.writer import BundleExistsError
from detector.checkpoint.objects import ObjectStoreError
from detector.checkpoint.tree import CheckpointFormatError
from detector.records import DataError

# Bad input, a missing extra, an unreachable object store or a full disk: the message says what and where.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointFormatError,
    DataError,
    BundleIntegrityError,
    BundleExistsError,
    MissingExtraError,
    PretrainedReferenceError,
    ObjectStoreError,
    Int8CheckError,
)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def user_error(error: BaseException) -> str | None:
    """The one-line message for ``error`` if it (or what it wraps) is a user-facing refusal, else None.

    Wrappers (jsonargparse's link errors, Lightning's background-write error) are looked through to
    the refusal they carry.
    """
    for cause in _chain(error):
        if isinstance(cause, USER_ERRORS):
            return str(cause)
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            where = f" while writing {cause.filename}" if cause.filename else ""
            return f"{cause.strerror or 'no space left on device'}{where}"
    return None
