"""Data: domain corpora (``corpora/``), task datasets (``datasets``), their scoring (``scoring``: encoding,
batches, the masked loss), token streams from text (``tokens``) and perplexity evaluation (``evaluation``)."""
