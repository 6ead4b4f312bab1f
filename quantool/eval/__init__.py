"""Evaluation: perplexity and speed."""
