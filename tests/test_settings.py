from __future__ import annotations

import dataclasses

import pytest

from flagmatch.settings import GROUPS, SETTINGS, Settings, settings_table


def test_every_field_is_declared_once_with_help_and_group():
    names = [f.name for f in dataclasses.fields(Settings)]
    assert [s.name for s in SETTINGS] == names
    for s in SETTINGS:
        assert s.help and s.group in GROUPS
        assert s.env == "FLAGMATCH_" + s.name.upper() and s.flag == "--" + s.name.replace("_", "-")
        assert f"`{s.env}`" in settings_table()


def test_values_are_parsed_by_the_field_type():
    s = Settings.load({"port": "9000"}, environ={"FLAGMATCH_OPEN_READS": "yes", "FLAGMATCH_API_TOKENS": "a:1, b:2",
                                                 "FLAGMATCH_DECODE_TIMEOUT": "2.5"})
    assert s.port == 9000 and s.open_reads is True and s.api_tokens == ("a:1", "b:2") and s.decode_timeout == 2.5
    with pytest.raises(ValueError, match="FLAGMATCH_OPEN_READS"):
        Settings.load(environ={"FLAGMATCH_OPEN_READS": "maybe"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


def test_the_settings_page_is_the_generated_table():
    """docs/settings.md carries the table generated from Settings (python benchmarks/readme.py rewrites it)."""
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    assert f"<!-- settings -->\n{settings_table()}\n<!-- /settings -->" in page
