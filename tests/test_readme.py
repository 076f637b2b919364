"""README.md's tables of options and error reasons stay true to the code.

The README's code examples are run against a real server by tests/test_docs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from clipvision.server.config.flags import build_parser
from clipvision.server.errors import Reason

README = (Path(__file__).parent.parent / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start : end if end != -1 else None]


def test_every_option_the_readme_names_is_a_server_option() -> None:
    options = _section("## Running the server")
    named = set(re.findall(r"`(--[a-z0-9-]+)`", options))
    known = {flag for action in build_parser({})._actions for flag in action.option_strings}
    assert named, "the options table is gone"
    assert named <= known, f"README names options the server lacks: {sorted(named - known)}"


def test_the_errors_table_lists_exactly_the_reasons_the_server_sends() -> None:
    errors = _section("### Errors")
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", errors))
    codes = {code.name for code in grpc.StatusCode}
    reasons = {reason.value for reason in Reason}
    listed = named - (codes - reasons)
    assert listed - reasons == set(), f"README lists unknown reasons: {sorted(listed - reasons)}"
    missing = reasons - named
    assert missing == set(), f"reasons missing from README's errors table: {sorted(missing)}"
