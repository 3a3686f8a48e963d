"""Data: domain corpora (``corpora/``), task datasets (``datasets``), their scoring (``scoring``: encoding,
batches, the masked loss) and perplexity evaluation (``evaluation``)."""
