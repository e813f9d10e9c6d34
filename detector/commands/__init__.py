"""The ``python -m detector`` verbs beside LightningCLI's: one module each, with ``main(argv) -> int``."""
