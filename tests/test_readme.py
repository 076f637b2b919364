"""README.md's tables of options, error reasons and RPCs stay true to the code and proto/.

The README's code examples are run against a real server by tests/test_docs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from clipvision.inference_v2 import grpc_service_pb2
from clipvision.server.config.flags import build_parser
from clipvision.server.errors import Reason
from clipvision.v1 import embedding_service_pb2

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


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


def proto_services() -> dict[str, list[str]]:
    """Every service declared in proto/ and its RPCs, in declaration order."""
    services: dict[str, list[str]] = {}
    for proto in sorted((ROOT / "proto").rglob("*.proto")):
        text = proto.read_text()
        for match in re.finditer(r"^service (\w+) \{\n(.*?)^\}", text, re.M | re.S):
            services[match[1]] = re.findall(r"^\s*rpc (\w+)\(", match[2], re.M)
    return services


def rpc_tables(markdown: str) -> dict[str, list[str]]:
    """Each table headed ``| <Service> RPC | ...``: the service and the RPCs its rows name."""
    tables: dict[str, list[str]] = {}
    lines = markdown.splitlines()
    for index, line in enumerate(lines):
        header = re.match(r"\|\s*(\w+) RPC\s*\|", line)
        if header is None:
            continue
        rows = []
        for row in lines[index + 2 :]:  # after the header's separator line
            if not row.startswith("|"):
                break
            name = re.match(r"\|\s*`(\w+)`\s*\|", row)
            rows.append(name[1] if name else row)
        tables[header[1]] = rows
    return tables


def rpc_table_problems(markdown: str) -> list[str]:
    """How the RPC tables of ``markdown`` differ from the services in proto/."""
    problems = []
    tables, services = rpc_tables(markdown), proto_services()
    for service in sorted(services.keys() - tables.keys()):
        problems.append(f"no table '| {service} RPC |'")
    for service in sorted(tables.keys() - services.keys()):
        problems.append(f"a table for {service}, which proto/ does not declare")
    for service in sorted(services.keys() & tables.keys()):
        rows, rpcs = tables[service], services[service]
        problems += [f"{service}: missing row {rpc}" for rpc in rpcs if rpc not in rows]
        problems += [f"{service}: extra row {row}" for row in rows if row not in rpcs]
        problems += [f"{service}: {row} twice" for row in set(rows) if rows.count(row) > 1]
    return problems


def test_the_proto_parser_agrees_with_the_generated_descriptors() -> None:
    services = proto_services()
    for descriptor in (embedding_service_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR):
        for service in descriptor.services_by_name.values():
            assert services[service.name] == [method.name for method in service.methods]


def test_the_rpc_tables_list_exactly_the_rpcs_of_the_services_in_proto() -> None:
    assert set(rpc_tables(_section("## Calling it"))) == {
        "EmbeddingService",
        "GRPCInferenceService",
    }
    assert rpc_table_problems(README) == []


def test_the_rpc_table_check_sees_a_missing_or_extra_row() -> None:
    missing = re.sub(r"^\| `EmbedTexts` \|.*\n", "", README, count=1, flags=re.M)
    assert rpc_table_problems(missing) == ["EmbeddingService: missing row EmbedTexts"]
    extra = README.replace(
        "| `ServerLive` |", "| `RepositoryIndex` | not served |\n| `ServerLive` |", 1
    )
    assert rpc_table_problems(extra) == ["GRPCInferenceService: extra row RepositoryIndex"]
