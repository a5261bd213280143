"""A corpus of hostile, broken, mislabelled and odd model files, written into a folder.

Every payload is harmless: if it ever ran, it would only create the file
``MARKER_NAME`` in the corpus folder (via ``open(marker, 'w')``, ``os.system('touch ...')``
or TorchScript's ``torch.from_file``), which the tests then look for.

``build_corpus(folder)`` writes every case and returns ``{name: path}``; ``CASES`` says
what lipcheck must answer for each: ``kind`` is ``untrusted`` / ``broken`` /
``unsupported`` (exit 2, one line naming ``fragment``) or ``ok`` (exit 0, ``fragment`` in
the JSON).

One module per category registers its cases with ``@case`` (``registry.py``); the files
are assembled with the building blocks in ``forge.py``. A new case is one function in the
module of its category.

Write the corpus somewhere and look at it::

    python tests/corpus /tmp/corpus
"""

from __future__ import annotations

# Imported for their registrations, in this order (the order of the test ids).
# isort: off
from . import payloads, broken, safetensors_cases, recognised, odd  # noqa: F401
# isort: on
from .forge import MARKER_NAME, safetensors_bytes
from .odd import ODD_KEYS
from .registry import CASES, Case, build_case, build_corpus, listing

__all__ = ["CASES", "MARKER_NAME", "ODD_KEYS", "Case", "build_case", "build_corpus", "listing", "safetensors_bytes"]
