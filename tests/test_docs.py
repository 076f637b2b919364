"""The code blocks of README.md and docs/*.md run as written, against a real server.

The convention, for whoever writes the docs:

- Every fenced block names its language. ``bash``, ``sh``, ``console`` (the ``$ `` lines),
  ``python`` and ``js`` blocks are run, in document order, each document in a working
  directory of its own that looks like the repository root (``tests/data/...``, ``proto/``
  and ``.venv`` resolve as in a clone), with ``.venv/bin`` on PATH. A block may use files
  an earlier block of the same document wrote. Python blocks are fed line by line to the
  interactive interpreter, as if pasted into ``python``: there a blank line ends an
  indented block, so leave none inside one, and one after it before a dedented line.
- ``text``, ``json``, ``jsonl`` and ``yaml`` blocks are output samples or data: never run;
  JSON and YAML are parsed.
- A block that cannot run here says why in an HTML comment on the line just before its
  opening fence: ``<!-- doc-test: skip needs a Docker engine -->``. Blocks in any other
  language (Go, Java, PromQL...) must carry it. Skipped blocks are still checked where a
  tool exists: Python is compiled and checked for undefined names (ruff's pyflakes rules),
  shell by ``bash -n``, JavaScript by ``node --check``, Go by ``gofmt``.
- A Python block marked ``<!-- doc-test: kserve -->`` runs with the interpreter that
  ``CLIPVISION_KSERVE_PYTHON`` names (``scripts/test`` makes one: kserve pins protobuf<7,
  clipvision's client needs 7, so they cannot share an environment); without it the block
  is skipped, saying so.
- Exactly one block is marked ``<!-- doc-test: server -->``: the ``scripts/serve`` line that
  starts the server the other blocks talk to. This test starts ``clipvision-server`` with
  the same flags, once for the module, on free ports; every block has the addresses that
  line names (``--address``, default 127.0.0.1:50051, ``--metrics-address`` and
  ``--http-address``) replaced
  by the real ones, and ``CLIPVISION_SERVER`` set to the server.

A block passes when it exits with status 0. Write examples that fail loudly: let Python
raise, let shell commands fail (blocks run under ``bash -e -o pipefail``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash", "sh", "console", "python", "js"}
PLAIN = {"text", "json", "jsonl", "yaml"}
MARKER = re.compile(r"<!--\s*doc-test:\s*(?P<kind>skip|server|kserve)\b\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^\s`]*)")
DEFAULT_ADDRESS = "127.0.0.1:50051"
BLOCK_TIMEOUT = 90.0
START_TIMEOUT = 120.0
NODE_MODULES = ROOT / "tests" / "node" / "node_modules"
KSERVE_PYTHON = os.environ.get("CLIPVISION_KSERVE_PYTHON")
# Python examples are fed line by line to the interactive interpreter, as a reader pastes
# them into `python`; the first traceback ends the run with status 1.
PASTE_INTO_PYTHON = """
import code, sys

class Console(code.InteractiveConsole):
    def showtraceback(self):
        super().showtraceback()
        sys.exit(1)

    def showsyntaxerror(self, filename=None, **kwargs):
        super().showsyntaxerror(filename)
        sys.exit(1)

console = Console()
for line in sys.stdin.read().splitlines():
    console.push(line)
console.push("")
"""


@dataclass(frozen=True)
class Block:
    """One fenced code block of a document."""

    doc: Path
    line: int
    """The line of its opening fence, from 1."""
    lang: str
    code: str
    marker: str | None
    """``skip``, ``server``, ``kserve`` or None."""
    reason: str

    @property
    def name(self) -> str:
        doc = self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc.name
        return f"{doc}:{self.line}:{self.lang or 'untagged'}"

    @property
    def runs(self) -> bool:
        return self.lang in RUN and self.marker in (None, "kserve")


def parse_blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the marker on the line before each."""
    lines = doc.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        start, indent, fence = index, len(opening["indent"]), opening["fence"]
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        index += 1
        while index < len(lines) and not closing.match(lines[index]):
            body.append(
                lines[index][indent:] if not lines[index][:indent].strip() else lines[index]
            )
            index += 1
        index += 1
        marker = MARKER.search(lines[start - 1]) if start > 0 else None
        found.append(
            Block(
                doc=doc,
                line=start + 1,
                lang=opening["lang"].lower(),
                code="\n".join(body) + "\n",
                marker=marker["kind"] if marker else None,
                reason=marker["reason"] if marker else "",
            )
        )
    return found


BLOCKS = [block for doc in DOCS for block in parse_blocks(doc)]


def console_commands(code: str) -> str:
    """The commands of a ``console`` block: ``$ `` lines and their continuations."""
    commands: list[str] = []
    continuing = False
    for line in code.splitlines():
        if line.startswith("$ ") or continuing:
            commands.append(line[2:] if line.startswith("$ ") and not continuing else line)
            continuing = line.endswith("\\")
    return "\n".join(commands) + "\n"


def serve_argv(block: Block) -> list[str]:
    """The flags of the one ``scripts/serve`` command in the server block."""
    commands = [shlex.split(line, comments=True) for line in block.code.splitlines()]
    commands = [words for words in commands if words]
    assert len(commands) == 1, f"{block.name}: the server block must hold one command"
    assert commands[0][0] == "scripts/serve", f"{block.name}: the server block runs scripts/serve"
    return commands[0][1:]


def take_flag(argv: list[str], flag: str) -> tuple[list[str], str | None]:
    """``argv`` without ``flag`` (``--flag V`` or ``--flag=V``), and its value."""
    rest: list[str] = []
    value: str | None = None
    words = iter(argv)
    for word in words:
        if word == flag:
            value = next(words)
        elif word.startswith(flag + "="):
            value = word.partition("=")[2]
        else:
            rest.append(word)
    return rest, value


def clean_environment() -> dict[str, str]:
    """This process's environment without CLIPVISION_* settings, with its venv first on PATH."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPVISION_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class DocServer:
    """The server the docs talk to: each address the docs name -> where it really listens."""

    addresses: dict[str, str]
    log: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def doc_server() -> Iterator[DocServer]:
    (block,) = [block for block in BLOCKS if block.marker == "server"]
    argv, doc_address = take_flag(serve_argv(block), "--address")
    argv, doc_metrics = take_flag(argv, "--metrics-address")
    argv, doc_http = take_flag(argv, "--http-address")
    argv += ["--address", "127.0.0.1:0"]
    if doc_metrics is not None:
        argv += ["--metrics-address", "127.0.0.1:0"]
    if doc_http is not None:
        argv += ["--http-address", "127.0.0.1:0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "clipvision.server.cli", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_environment(),
    )
    server = DocServer({})
    ports: dict[str, str] = {}
    found = threading.Condition()

    def read_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            with found:
                server.log.append(line)
                if match := re.search(r"listening on (\S+:\d+)$", line.strip()):
                    ports["grpc"] = match[1]
                if match := re.search(r"metrics on http://(\S+:\d+)/metrics", line):
                    ports["metrics"] = match[1]
                if match := re.search(r"http on http://(\S+:\d+)$", line.strip()):
                    ports["http"] = match[1]
                found.notify_all()
        with found:
            found.notify_all()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        with found:
            found.wait_for(
                lambda: "grpc" in ports or process.poll() is not None, timeout=START_TIMEOUT
            )
        assert "grpc" in ports, "the docs' server did not start:\n" + "".join(server.log)
        server.addresses[doc_address or DEFAULT_ADDRESS] = ports["grpc"]
        if doc_metrics is not None:
            server.addresses[doc_metrics] = ports["metrics"]
        if doc_http is not None:
            server.addresses[doc_http] = ports["http"]
        serving = False
        with grpc.insecure_channel(ports["grpc"]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            answers = health.Watch(request, timeout=START_TIMEOUT)
            try:
                for answer in answers:
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        serving = True
                        answers.cancel()
                        break
            except grpc.RpcError:
                pass
        assert serving, "the docs' server never became SERVING:\n" + "".join(server.log)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        assert process.stderr is not None
        process.stderr.close()


class Workspace:
    """A document's working directory, shaped like the repository root, and its blocks run."""

    def __init__(self, directory: Path, server: DocServer) -> None:
        self.directory = directory
        self.server = server
        self.done: set[Block] = set()
        for entry in ROOT.iterdir():
            if not entry.name.startswith("."):  # .venv is linked below; .git, caches stay out
                (directory / entry.name).symlink_to(entry)
        venv = Path(sys.prefix)
        if (venv / "bin" / "activate").exists():
            (directory / ".venv").symlink_to(venv)
        else:  # not run from a virtual environment: an activate script that does the same
            (directory / ".venv" / "bin").mkdir(parents=True)
            bindir = shlex.quote(str(Path(sys.executable).parent))
            (directory / ".venv" / "bin" / "activate").write_text(f'PATH={bindir}:"$PATH"\n')
        if NODE_MODULES.is_dir():  # for `import ... from "@grpc/grpc-js"` in js blocks
            (directory / "node_modules").symlink_to(NODE_MODULES)
        self.env = clean_environment()
        self.env["CLIPVISION_SERVER"] = server.addresses[DEFAULT_ADDRESS]

    def run(self, block: Block) -> None:
        """Run ``block``, after any earlier block of its document not yet run."""
        for earlier in BLOCKS:
            same_doc = earlier.doc == block.doc and earlier.line < block.line
            # A kserve block without kserve's interpreter is skipped, and nothing after it
            # depends on it (each of them starts its own client).
            skipped = earlier.marker == "kserve" and KSERVE_PYTHON is None
            if same_doc and earlier.runs and not skipped and earlier not in self.done:
                self.execute(earlier, before=block)
        self.execute(block)

    def execute(self, block: Block, before: Block | None = None) -> None:
        code = block.code
        for named, real in self.server.addresses.items():
            code = code.replace(named, real)
        stdin: str | None = None
        if block.lang == "python":
            python = KSERVE_PYTHON if block.marker == "kserve" else sys.executable
            assert python is not None, f"{block.name} needs CLIPVISION_KSERVE_PYTHON"
            argv, stdin = [python, "-c", PASTE_INTO_PYTHON], code
        elif block.lang == "js":
            script = self.directory / f"example-{block.line}.mjs"
            script.write_text(code)
            argv = ["node", str(script)]
        else:
            script_text = console_commands(code) if block.lang == "console" else code
            argv = ["bash", "-e", "-o", "pipefail", "-c", script_text]
        done = subprocess.run(
            argv,
            cwd=self.directory,
            env=self.env,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
        self.done.add(block)
        if done.returncode != 0:
            context = f" (run before {before.name})" if before else ""
            pasted = "SyntaxError" in done.stderr and "Traceback" not in done.stderr
            if block.lang == "python" and pasted:
                context += (
                    " as pasted into python (a line after an indented block needs a blank "
                    "line before it, and a blank line inside one ends it)"
                )
            pytest.fail(
                f"{block.name}{context} exited with status {done.returncode}:\n{code}"
                f"--- stdout:\n{done.stdout}--- stderr:\n{done.stderr}"
                f"--- server log (last lines):\n{''.join(self.server.log[-20:])}",
                pytrace=False,
            )


@pytest.fixture(scope="module")
def workspaces(
    doc_server: DocServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[Path, Workspace]:
    return {doc: Workspace(tmp_path_factory.mktemp(doc.stem), doc_server) for doc in DOCS}


def test_every_block_names_its_language_and_runs_or_says_why_not() -> None:
    problems: list[str] = []
    for block in BLOCKS:
        if not block.lang:
            problems.append(f"{block.name}: name the language (text for output and synopses)")
        elif block.marker == "skip" and not block.reason:
            problems.append(f"{block.name}: say why the block is skipped")
        elif block.lang not in RUN | PLAIN and block.marker != "skip":
            problems.append(f"{block.name}: cannot run here; mark it <!-- doc-test: skip WHY -->")
        elif block.marker == "kserve" and block.lang != "python":
            problems.append(f"{block.name}: only python blocks run with kserve's interpreter")
    servers = [block.name for block in BLOCKS if block.marker == "server"]
    if len(servers) != 1:
        problems.append(f"exactly one block must be marked doc-test: server, not {servers}")
    assert problems == []


def test_the_docs_server_block_starts_the_server_from_a_clone() -> None:
    (block,) = [block for block in BLOCKS if block.marker == "server"]
    assert block.lang == "bash"
    argv = serve_argv(block)
    assert "--dummy-weights" in argv, "the tour must run without downloading weights"
    assert (ROOT / "scripts" / "serve").stat().st_mode & 0o111


def _lint_argv(block: Block) -> list[str] | None:
    if block.lang in ("bash", "sh", "console"):
        return ["bash", "-n"]
    if block.lang == "js" and shutil.which("node"):
        return ["node", "--check", "--input-type=module"]
    if block.lang == "go" and shutil.which("gofmt"):
        return ["gofmt", "-e"]
    if block.lang == "python":
        # pyflakes' checks (undefined names above all); snippets may import for show.
        ruff = [sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--quiet"]
        return [*ruff, "--select", "F", "--ignore", "F401,F841", "--stdin-filename", "x.py", "-"]
    return None


CHECKED = [
    block for block in BLOCKS if _lint_argv(block) is not None or block.lang in PLAIN - {"text"}
]


@pytest.mark.parametrize("block", CHECKED, ids=[block.name for block in CHECKED])
def test_block_parses(block: Block) -> None:
    if block.lang == "python":
        compile(block.code, block.name, "exec")
    if block.lang == "json":
        json.loads(block.code)
    elif block.lang == "jsonl":
        for line in block.code.splitlines():
            if line.strip():
                json.loads(line)
    elif block.lang == "yaml":
        list(yaml.safe_load_all(block.code))
    argv = _lint_argv(block)
    if argv is None:
        return
    code = console_commands(block.code) if block.lang == "console" else block.code
    done = subprocess.run(
        argv, input=code, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"{block.name}:\n{code}\n{done.stdout}{done.stderr}"


RUNNABLE = [block for block in BLOCKS if block.runs]


# The first block also waits for the server to load its model (on a cold cache, longer).
@pytest.mark.timeout(START_TIMEOUT + 3 * BLOCK_TIMEOUT)
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_block_runs(block: Block, workspaces: dict[Path, Workspace]) -> None:
    if block.lang == "js":
        if shutil.which("node") is None:
            pytest.skip("Node.js is not installed; js examples need the node command")
        if not NODE_MODULES.is_dir():
            pytest.fail("tests/node has no node_modules; run: npm ci --prefix tests/node")
    if block.marker == "kserve" and KSERVE_PYTHON is None:
        pytest.skip("needs CLIPVISION_KSERVE_PYTHON: a Python with kserve (scripts/test makes one)")
    workspaces[block.doc].run(block)


def test_a_broken_example_fails_its_test(tmp_path: Path) -> None:
    doc = tmp_path / "broken.md"
    doc.write_text(
        "Intro.\n\n```python\nprint(undefined_name)\n```\n\n"
        "<!-- doc-test: skip needs Go -->\n```go\nfmt.Println(1)\n```\n\n```\nuntagged\n```\n"
    )
    python, go, untagged = parse_blocks(doc)
    assert (python.line, python.lang, python.runs) == (3, "python", True)
    assert (go.marker, go.reason, go.runs) == ("skip", "needs Go", False)
    assert untagged.lang == ""
    with pytest.raises(AssertionError, match="F821 Undefined name `undefined_name`"):
        test_block_parses(python)
    (tmp_path / "work").mkdir()
    workspace = Workspace(tmp_path / "work", DocServer({DEFAULT_ADDRESS: DEFAULT_ADDRESS}))
    with pytest.raises(pytest.fail.Exception, match="NameError"):
        workspace.execute(python)
    # Runs as a script, but not when pasted into python: the dedent needs a blank line.
    unpastable = replace(python, code="if True:\n    x = 1\nprint(x)\n")
    with pytest.raises(pytest.fail.Exception, match="as pasted into python"):
        workspace.execute(unpastable)
    # A failing command fails the block, even inside a pipeline.
    with pytest.raises(pytest.fail.Exception, match="exited with status 1"):
        workspace.execute(replace(python, lang="bash", code="false | cat\necho carried on\n"))
