"""Agreement of medcap's rule-based findings labeler with IU X-Ray's human MeSH labels.

    python benchmarks/findings_agreement.py

Labels findings + impression of the 3,955 bundled Open-i reports (torchxrayvision's data file) with
:func:`medcap_helpers.findings.label_report` and compares them with the MeSH major terms mapped by
``MESH_TO_CLASS``. Phrase lists were developed on even uids only; the odd half is the held-out result.
Writes ``benchmarks/results/findings_agreement.json`` (both halves, both uncertain settings on the even
half, the literal-"normal" variant, the mapping) and prints the odd-half table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcap_helpers import findings  # noqa: E402
from medcap_helpers.reports import bundled_reports  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "findings_agreement.json"


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("n_reports", "micro", "macro", "included")}


def main() -> None:
    parsed = bundled_reports()
    reports = parsed.reports
    even = findings.validate_against_mesh(reports, "even")
    odd = findings.validate_against_mesh(reports, "odd")
    out = {
        "description": "Rule-based labeler (findings + impression, cleaned) vs MeSH major terms of IU X-Ray. "
                       "Developed on even uids; odd uids held out. Averages over classes with >= 25 positives.",
        "reports_total": len(reports),
        "reports_even": even["n_reports"],
        "reports_odd": odd["n_reports"],
        "uncertain_as_positive": findings.UNCERTAIN_AS_POSITIVE,
        "odd": odd,
        "even": even,
        "even_uncertain_as_positive": _summary(
            findings.validate_against_mesh(reports, "even", uncertain_as_positive=True)),
        "odd_uncertain_as_positive": _summary(
            findings.validate_against_mesh(reports, "odd", uncertain_as_positive=True)),
        "even_literal_normal_reference": _summary(
            findings.validate_against_mesh(reports, "even", chexpert_no_finding=False)),
        "odd_literal_normal_reference": _summary(
            findings.validate_against_mesh(reports, "odd", chexpert_no_finding=False)),
        "mesh_to_class": {k: list(v) for k, v in findings.MESH_TO_CLASS.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"Odd-uid half ({odd['n_reports']} reports), uncertain as negative:\n")
    print(findings.agreement_markdown(odd))
    print(f"\nEven half: micro-F1 {even['micro']['f1']:.3f}, macro-F1 {even['macro']['f1']:.3f}")
    print("\nOdd-half confusions (most false positives / negatives):")
    conf = odd["confusions"]
    for kind in ("fp", "fn"):
        for cls in sorted(conf, key=lambda c: -conf[c][kind])[:3]:
            print(f"  {kind.upper()} {cls}: {conf[cls][kind]}")
            for ex in conf[cls][f"{kind}_examples"]:
                print(f"     uid {ex['uid']} {ex['mesh']}: {ex.get('sentences') or ex.get('text')}")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
