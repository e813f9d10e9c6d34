"""``python -m detector``: train, validate, test and predict through LightningCLI, plus the tool verbs."""

from __future__ import annotations

import importlib
import sys

from detector.bundle.writer import BundleExistsError
from detector.cli import build_cli
from detector.errors import user_error
from detector.run_folder import LastCheckpointError, RunFolderError

# Verbs beside LightningCLI's own: each module has ``main(argv) -> int``.
TOOLS = {
    "checkpoints": "detector.commands.checkpoints",
    "export": "detector.commands.export",
    "score": "detector.commands.score",
    "evaluate": "detector.commands.evaluate",
}


def main(args: list[str] | None = None) -> None:
    """Run the command line on ``args`` (``sys.argv[1:]`` when ``None``)."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in TOOLS:
            code = importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
            if code:
                raise SystemExit(code)
            return
        build_cli(args)
    except (RunFolderError, BundleExistsError, LastCheckpointError) as error:
        # Refused before training, nothing written: one line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        message = user_error(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
