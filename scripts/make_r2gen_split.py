"""Derive the package's R2Gen split (study id -> split, no report text) from R2Gen's iu_xray annotation.json.

    python scripts/make_r2gen_split.py ../shared/iu_xray_sample/r2gen_annotation.json

Writes ``medcap_helpers/r2gen_split.json``: ``{"train": [...], "validation": [...], "test": [...]}`` of
study ids (``CXR<uid>_IM-<series>``, the R2Gen folder names), sorted. Only ids are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"train": "train", "val": "validation", "test": "test"}


def main(annotation: str) -> None:
    splits = json.loads(Path(annotation).read_text())
    out = {"source": "R2Gen (Chen et al., EMNLP 2020) iu_xray annotation.json, study ids only",
           **{NAMES[name]: sorted(str(entry["id"]) for entry in splits[name]) for name in NAMES}}
    target = Path(__file__).resolve().parents[1] / "medcap_helpers" / "r2gen_split.json"
    target.write_text(json.dumps(out, indent=0) + "\n")
    print({name: len(out[name]) for name in NAMES.values()}, "->", target)


if __name__ == "__main__":
    main(sys.argv[1])
