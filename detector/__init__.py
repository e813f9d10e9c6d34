"""Detect machine-written text with a fine-tuned DeBERTa classifier."""
