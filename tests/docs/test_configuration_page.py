"""docs/configuration.md's reference is what sidecar/settings.py generates: one truth per fact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sidecar import settings as s
from sidecar import settings_doc

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"
ENTRIES = [e for sec in settings_doc.sections() for e in sec.entries]


def test_the_committed_page_is_what_the_code_generates():
    page = PAGE.read_text(encoding="utf-8")
    assert settings_doc.filled(page) == page, "run `make docs` and commit docs/configuration.md"


def test_every_section_and_field_is_in_the_reference():
    described = {(sec.name, e.name) for sec in settings_doc.sections() for e in sec.entries}
    for sec in dataclasses.fields(s.Settings):
        section = getattr(s.Settings(), sec.name)
        for f in dataclasses.fields(section):
            assert (sec.name, f.name) in described


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.variable)
def test_every_field_has_a_description_from_its_comment(entry):
    assert entry.description, f"write a comment above {entry.section}.{entry.name} in settings.py"


def test_every_section_has_a_description():
    assert all(sec.description for sec in settings_doc.sections())


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.variable)
def test_the_variable_and_the_default_round_trip(entry):
    """The documented variable sets the documented field, and the documented default, written
    as the variable's value, loads as the default itself."""
    text = entry.default
    if entry.type == "string":
        text = text[1:-1]
    elif entry.type == "list of strings":
        text = ",".join(v.strip().strip('"') for v in text[1:-1].split(",") if v.strip())
    loaded = s.load(environ={entry.variable: text})
    assert getattr(getattr(loaded, entry.section), entry.name) == getattr(
        getattr(s.Settings(), entry.section), entry.name
    )


@pytest.mark.parametrize(
    ("variable", "words"),
    [
        ("HEATCROP_SERVER_WORKER_NICE", "in [0, 19]"),
        ("HEATCROP_SERVER_ANSWER_MARGIN_MS", "below `deadline_ms`"),
        ("HEATCROP_KERNEL_STEPS", "an int in [2,"),
        ("HEATCROP_LEGACY_DIALECT", "thumbor, imgproxy or template"),
        ("HEATCROP_LEGACY_TEMPLATE", "plain {h} {path} {w}"),
    ],
)
def test_bounds_are_the_rules_validate_applies(variable, words):
    (entry,) = [e for e in ENTRIES if e.variable == variable]
    assert words in entry.allowed


def test_a_wrong_value_is_refused_with_the_documented_bound():
    (entry,) = [e for e in ENTRIES if e.variable == "HEATCROP_SERVER_WORKER_NICE"]
    with pytest.raises(s.SettingsError, match=r"HEATCROP_SERVER_WORKER_NICE=20: must be in"):
        s.load(environ={entry.variable: "20"})
    assert "must be " + entry.allowed in str(_error({entry.variable: "20"}))


def _error(environ):
    try:
        s.load(environ=environ)
    except s.SettingsError as exc:
        return exc
    raise AssertionError("no error")


def test_the_generator_fills_only_between_its_markers():
    page = f"intro\n{settings_doc.BEGIN}\nstale\n{settings_doc.END}\noutro\n"
    out = settings_doc.filled(page)
    assert out.startswith("intro\n") and out.endswith(f"{settings_doc.END}\noutro\n")
    assert "stale" not in out and "`HEATCROP_ENGINE_THREADS`" in out
    with pytest.raises(ValueError, match="markers"):
        settings_doc.filled("no markers")


def test_make_docs_writes_the_page(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text(f"# c\n{settings_doc.BEGIN}\n{settings_doc.END}\n")
    assert settings_doc.main(["--write", str(page)]) == 0
    assert page.read_text() == settings_doc.filled(page.read_text())
    makefile = (ROOT / "Makefile").read_text()
    assert "python -m sidecar.settings_doc --write docs/configuration.md" in makefile
