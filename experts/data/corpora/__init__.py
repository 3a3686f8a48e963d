"""Offline domain corpora for Branch-Train-Merge.

Every built-in domain is extracted from text that ships with Python or with a small pip package
(see ``DOMAINS``); users can add their own domain with :func:`add_user_corpus`.  A built corpus is a
folder ``root/<name>/`` holding ``train.txt``, ``validation.txt``, ``test.txt`` and ``meta.json``.

Determinism: an extractor yields ``(split key, text)`` documents in a fixed order (sorted files,
canonical verse order); exact duplicates are dropped. ``build_corpus`` picks documents under the byte
budget (all three files together) by a shuffle seeded with the domain name and keeps the picked ones
in extraction order. Validation and test then take whole key groups (a licence family, a chapter, a
module) in a stable hash order until each holds about 5% of the bytes; the rest is train. The same
source version and budget therefore always give byte-identical files (checked by ``sha256`` in the
meta). Documents are stripped, newline-normalised and joined with ``SEPARATOR``; files end in "\\n".
Files are written atomically (temp file in the same folder, then ``os.replace``), ``meta.json`` last.
"""

from .errors import (
    CorpusError,
    CorpusExistsError,
    CorpusUnavailableError,
    InvalidCorpusError,
    UnknownCorpusError,
)
from .sources import DOMAINS, Domain, available_domains, extract_documents
from .store import (
    DEFAULT_MAX_BYTES,
    NAME_RE,
    SEPARATOR,
    SPLITS,
    CorpusInfo,
    add_user_corpus,
    build_corpus,
    get_corpus,
    list_corpora,
    load_split,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DOMAINS",
    "NAME_RE",
    "SEPARATOR",
    "SPLITS",
    "CorpusError",
    "CorpusExistsError",
    "CorpusInfo",
    "CorpusUnavailableError",
    "Domain",
    "InvalidCorpusError",
    "UnknownCorpusError",
    "add_user_corpus",
    "available_domains",
    "build_corpus",
    "extract_documents",
    "get_corpus",
    "list_corpora",
    "load_split",
]
