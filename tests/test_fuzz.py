"""Property-based tests of the report parser and the text cleaner (hypothesis).

* ``parse_report_xml`` on generated Open-i XML with random section texts and ids gives back the
  FINDINGS / IMPRESSION text (whitespace collapsed; equal after cleaning), the uid and the image ids;
  on arbitrary bytes, mangled reports and arbitrary text it returns a report or raises
  ``ReportParseError`` naming the source, never anything else.
* ``clean_text`` is idempotent and leaves no ``XXXX`` token, no double or edge whitespace, no space
  before punctuation; ``lowercase=True`` is the lower-cased result.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape, quoteattr

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medcap_helpers.reports import (
    Report,
    ReportParseError,
    clean_text,
    parse_report_xml,
)

FAST = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters XML 1.0 can carry (no control characters, surrogates or U+FFFE/U+FFFF).
xml_chars = st.characters(min_codepoint=0x20, max_codepoint=0xFFFD, blacklist_categories=("Cs", "Cc"))
report_words = st.sampled_from([
    "XXXX", "XXXX-year-old", "x-XXXX", "(XXXX)", "heart", "Lungs", "are", "clear", "normal.", "No", "effusion,",
    "pneumothorax;", "T12", "5", "mm", ":", ".", ",", "(", ")", "..", "-", "/", "?", "!", "é", "ß", "İ", "\u00a0",
    "\t", "\n", "  ", "'s",
])
report_like_text = st.lists(report_words, max_size=30).map(" ".join) | st.lists(report_words, max_size=30).map("".join)
section_text = report_like_text | st.text(xml_chars, max_size=80)
image_id = st.builds(lambda u, s, i: f"CXR{u}_IM-{s:04d}-{i}", st.integers(1, 4000), st.integers(0, 9999),
                     st.sampled_from(["1001", "2001", "3001", "1001-0001"]))


def open_i_xml(uid: int, findings: str | None, impression: str | None, image_ids: list[str]) -> bytes:
    sections = "".join(f"<AbstractText Label={quoteattr(label)}>{escape(text)}</AbstractText>"
                       for label, text in (("FINDINGS", findings), ("IMPRESSION", impression)) if text is not None)
    images = "".join(f"<parentImage id={quoteattr(i)}><figureId>F1</figureId></parentImage>" for i in image_ids)
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/><uId id="CXR{uid}"/>'
            f'<pmcId id="{uid}"/><IUXRId id="{uid}"/><MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="COMPARISON">None.</AbstractText>{sections}</Abstract></Article>'
            f"</MedlineCitation><MeSH><major>normal</major></MeSH>{images}</eCitation>").encode("utf-8")


def collapsed(text: str | None) -> str:
    return " ".join((text or "").split())


# --------------------------------------------------------------------------------------- parser
@FAST
@given(uid=st.integers(1, 10**6), findings=st.none() | section_text, impression=st.none() | section_text,
       image_ids=st.lists(image_id, max_size=4, unique=True))
@example(uid=1, findings="Heart  XXXX normal.\n\tLungs clear.", impression="XXXX.", image_ids=["CXR1_IM-0001-1001"])
def test_generated_reports_round_trip(uid: int, findings: str | None, impression: str | None,
                                      image_ids: list[str]) -> None:
    report = parse_report_xml(open_i_xml(uid, findings, impression, image_ids), f"{uid}.xml")
    assert report.uid == str(uid)
    assert report.findings == collapsed(findings)
    assert report.impression == collapsed(impression)
    assert clean_text(report.findings) == clean_text(findings)
    assert clean_text(report.impression) == clean_text(impression)
    assert report.image_ids == image_ids
    assert report.mesh_major == ["normal"] and report.is_normal


def _parses_or_reports(data: bytes | str, name: str) -> None:
    try:
        report = parse_report_xml(data, name)
    except ReportParseError as err:
        assert str(err).startswith(f"{name}: "), "the error names the file"
    else:
        assert isinstance(report, Report) and report.uid


@FAST
@given(data=st.binary(max_size=300))
@example(data=b'<?xml version="1.0" encoding="klingon"?><a/>')
@example(data=b'<?xml version="1.0" encoding="utf-16"?><a/>')
@example(data=b"\xff\xfe<\x00a\x00/\x00>\x00")
@example(data=b"")
def test_arbitrary_bytes_parse_or_raise_report_parse_error(data: bytes) -> None:
    _parses_or_reports(data, "fuzz.xml")


@FAST
@given(text=st.text(max_size=200))
@example(text="\ud800")
@example(text="<eCitation><IUXRId id='1'/></eCitation>")
def test_arbitrary_text_parses_or_raises_report_parse_error(text: str) -> None:
    _parses_or_reports(text, "42.xml")


@FAST
@given(findings=section_text, cut=st.integers(0, 2000), noise=st.binary(max_size=8), position=st.integers(0, 2000))
def test_mangled_reports_parse_or_raise_report_parse_error(findings: str, cut: int, noise: bytes,
                                                           position: int) -> None:
    """Truncated reports with a few random bytes spliced in: the damage a bad download or copy does."""
    whole = open_i_xml(7, findings, "No acute disease.", ["CXR7_IM-0007-1001"])
    damaged = whole[:cut] if cut < len(whole) else whole
    position = min(position, len(damaged))
    _parses_or_reports(damaged[:position] + noise + damaged[position:], "7.xml")


def test_entity_expansion_is_refused() -> None:
    """A 'billion laughs' report is rejected by the XML parser instead of exhausting memory."""
    entities = '<!ENTITY a0 "lol">' + "".join(f'<!ENTITY a{i} "{("&a" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    bomb = (f'<?xml version="1.0"?><!DOCTYPE e [{entities}]><eCitation><IUXRId id="1"/>'
            '<AbstractText Label="FINDINGS">&a9;</AbstractText></eCitation>')
    try:
        report = parse_report_xml(bomb, "bomb.xml")
    except ReportParseError as err:
        assert "bomb.xml" in str(err)
    else:  # an expat without amplification limits would have expanded it: 3 * 10**9 characters
        assert len(report.findings) < 10**6


# --------------------------------------------------------------------------------------- cleaner
punctuation_soup = st.text(alphabet=" .,;:!?()X-/'stab\n", max_size=40)  # where the cleanup rules interact
cleaner_input = report_like_text | punctuation_soup | st.text(max_size=120)


@FAST
@given(text=cleaner_input)
@example(text="XXXX XXXX are grossly intact.")
@example(text="Effusion.. Heart (XXXX) normal. , ; XXXX.")
@example(text="( (XXXX) )")  # nested empty parentheses: once left "()" behind
def test_clean_text_properties(text: str) -> None:
    cleaned = clean_text(text)
    assert clean_text(cleaned) == cleaned, "idempotent"
    assert not re.search("X{3,}", cleaned), "no de-identification token left"
    assert "  " not in cleaned and not re.search(r"\s\s", cleaned), "no double whitespace"
    assert cleaned == cleaned.strip(), "no leading/trailing whitespace"
    assert not re.search(r"\s[.,;:!?)]", cleaned), "no space before punctuation"
    assert not cleaned.startswith((".", ",", ";", ":", "!", "?"))
    lower = clean_text(text, lowercase=True)
    assert lower == cleaned.lower()
    assert clean_text(lower, lowercase=True) == lower, "idempotent with lowercase=True"


@FAST
@given(text=cleaner_input)
@example(text="XXXX-year-old(XXXX)x-XXXX")  # "(XXXX)" between two words once glued them together
def test_clean_text_keeps_the_words_that_are_not_tokens(text: str) -> None:
    """Cleaning only removes tokens, whitespace and stray punctuation: every other word survives in order."""
    def words(value: str) -> list[str]:
        without_tokens = re.sub(r"X{3,}(?:'[st]?)?", " ", value)  # a token with its possessive ('s)
        return re.findall(r"[^\W\d_]+|\d+", without_tokens)

    kept = words(clean_text(text))
    assert [w.lower() for w in kept] == [w.lower() for w in words(text)]


@settings(max_examples=50, deadline=None)
@given(text=cleaner_input)
def test_clean_text_accepts_none_and_empty(text: str) -> None:
    assert clean_text(None) == "" and clean_text("") == ""
    assert isinstance(clean_text(text), str)
