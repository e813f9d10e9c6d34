"""Inference bundles: a Hugging Face model folder with threshold, card and provenance; loading, scoring."""
