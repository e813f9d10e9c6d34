"""``python -m detector``: train, validate, test and predict through LightningCLI."""

from __future__ import annotations

import sys

from detector.cli import build_cli


def main(args: list[str] | None = None) -> None:
    """Run the command line on ``args`` (``sys.argv[1:]`` when ``None``)."""
    build_cli(args)


if __name__ == "__main__":
    main(sys.argv[1:])
