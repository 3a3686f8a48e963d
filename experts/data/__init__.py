"""Data: domain corpora, task datasets and their scoring, perplexity evaluation."""
