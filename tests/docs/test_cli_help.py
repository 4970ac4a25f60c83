"""`heatcrop --help` and each command's help agree with the settings reference."""

from __future__ import annotations

import argparse
import re

import pytest

from sidecar import cli, settings_doc
from sidecar import settings as s

ENTRIES = {e.variable: e for sec in settings_doc.sections() for e in sec.entries}
KEYS = {f"{e.section}.{e.name}": e for e in ENTRIES.values()}
SECTIONS = "|".join(sec.name for sec in settings_doc.sections())


def _helps() -> dict[str, str]:
    """Every parser's help text, by command (the top level is "")."""
    out: dict[str, str] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        out[name] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}".strip())

    walk(cli._parser(), "")
    return out


HELPS = _helps()


def test_every_command_has_a_help():
    assert set(HELPS) >= {"", "crop", "serve", "warm", "engines", "engines list", "settings"}


@pytest.mark.parametrize("command", sorted(HELPS))
def test_each_setting_a_help_names_is_in_the_reference_with_its_own_variable(command):
    text = " ".join(HELPS[command].split())
    for key, variable in re.findall(rf"\b((?:{SECTIONS})\.[a-z_]+), \$(HEATCROP_[A-Z_]+)", text):
        assert key in KEYS, f"`heatcrop {command}` names {key}, which is not a setting"
        assert KEYS[key].variable == variable
    for variable in re.findall(r"\$?\b(HEATCROP_[A-Z_]+)\b", text):
        assert variable in ENTRIES or variable in (s.CONFIG_ENV, "HEATCROP_"), variable


@pytest.mark.parametrize("command", ["", "crop", "serve", "warm", "engines list", "settings"])
def test_each_command_says_where_settings_come_from(command):
    text = " ".join(HELPS[command].split())
    assert f"${s.CONFIG_ENV}" in text
    assert "heatcrop settings" in text and "docs/configuration.md" in text


def test_options_that_default_to_a_setting_name_it():
    assert "engine.profile, $HEATCROP_ENGINE_PROFILE" in " ".join(HELPS["crop"].split())
    listing = " ".join(HELPS["engines list"].split())
    assert "engine.plan_dir, $HEATCROP_ENGINE_PLAN_DIR" in listing
    assert "engine.model_dir, $HEATCROP_ENGINE_MODEL_DIR" in listing


def test_the_profile_choices_are_the_values_the_setting_allows():
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    profile = next(a for a in sub.choices["crop"]._actions if a.dest == "profile")
    for choice in profile.choices:
        assert s.load(environ={"HEATCROP_ENGINE_PROFILE": choice}).engine.profile == choice
        assert choice in ENTRIES["HEATCROP_ENGINE_PROFILE"].allowed


def test_heatcrop_settings_prints_the_reference(capsys):
    assert cli.main(["settings"]) == 0
    assert capsys.readouterr().out == settings_doc.reference_markdown()
