"""The ``python -m detector`` verbs beside LightningCLI's: one module each, with ``main(argv) -> int``."""

from __future__ import annotations

import argparse


def add_no_verify(parser: argparse.ArgumentParser) -> None:
    """``--no-verify``, for the verbs that load a bundle (checked against its ``SHA256SUMS`` by default)."""
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the bundle's SHA256SUMS check (a bundle edited on purpose)",
    )
