"""python tests/corpus FOLDER: write the hostile corpus into FOLDER and list it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corpus import CASES, build_corpus  # noqa: E402

target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
paths = build_corpus(target)
width = max(len(n) for n in paths)
by_name = {c.name: c for c in CASES}
for name, path in paths.items():
    print(f"{name:{width}}  {by_name[name].kind:11}  {path}")
