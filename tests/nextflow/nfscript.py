"""Read this project's Nextflow modules and evaluate their Groovy the way Nextflow would.

* :func:`parse_module` splits a module's ``main.nf`` into directives, inputs, outputs, the
  ``script:`` and ``stub:`` sections and the helper functions after the process;
* :class:`Groovy` evaluates pieces of Groovy with Groovy 4 from the language-server jar: script
  sections rendered with given input values and ``task`` (exactly Nextflow's GString rules),
  ``containerOptions`` expressions, and the subworkflow's and facade's planning functions.

Only what Nextflow itself provides is emulated: ``file()``, ``error()``, ``log.warn``, ``params``,
``workflow``, ``task`` and the ``Path`` methods the code calls (``exists``, ``getText``,
``getBaseName``, ``mkdirs``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from nftools import ROOT, run_groovy

SECTIONS = ("input", "output", "when", "script", "stub")


@dataclass
class Output:
    emit: str
    kinds: list[tuple[str, str]]  # (val|path|eval|env, name or command)
    topic: str | None = None
    optional: bool = False  # `optional: true`: a task may leave it out (e.g. BUILD_PYRAMID's plans of a level step)


@dataclass
class Process:
    name: str
    path: Path
    directives: str
    inputs: list[list[tuple[str, str]]]  # per input channel: [(val|path, name), ...]
    outputs: list[Output]
    script: str
    stub: str
    functions: str
    labels: list[str] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [name for channel in self.inputs for _, name in channel]

    def directive(self, name: str) -> str | None:
        m = re.search(rf"^\s*{name}\s+(.+)$", self.directives, re.MULTILINE)
        return m.group(1).strip() if m else None

    @property
    def container_options(self) -> str:
        """The containerOptions GString's expression (between ``"${`` and ``}"``); ``''`` when the
        process has none (its inputs are all staged files, which Nextflow binds itself)."""
        value = self.directive("containerOptions")
        if value is None:
            return "''"
        m = re.fullmatch(r'"\$\{(.*)\}"', value or "")
        if not m:
            raise AssertionError(f'{self.name}: containerOptions is not one "${{...}}" expression: {value}')
        return m.group(1)

    @property
    def path_outputs(self) -> list[str]:
        """The names (or glob patterns, GStrings unrendered) of every declared path output."""
        return [name for out in self.outputs for kind, name in out.kinds if kind == "path"]

    def output(self, emit: str) -> Output:
        for out in self.outputs:
            if out.emit == emit:
                return out
        raise KeyError(f"{self.name} has no output emit: {emit}")


# Qualifiers of a path input or output after its name, e.g. path(regions, arity: '1..*')
PATH_OPTIONS = r"\s*,\s*(?:arity|stageAs|name|hidden|followLinks|glob|includeInputs|maxDepth|optional|type)\s*:.*$"


def _components(decl: str) -> list[tuple[str, str]]:
    found = []
    for kind, arg in re.findall(r"\b(val|path|eval|env)\s*\(\s*(.*?)\s*\)(?=\s*(?:,|$))", decl):
        if kind == "path":
            arg = re.sub(PATH_OPTIONS, "", arg)
        found.append((kind, arg.strip("'\"")))
    if not found:  # "path model" / "val options"
        m = re.fullmatch(r"(val|path)\s+(\w+)", decl.strip())
        if m:
            found.append((m.group(1), m.group(2)))
    return found


def parse_module(path: Path) -> Process:
    text = path.read_text()
    m = re.search(r"^process (\w+) \{\n(.*?)^\}\n", text, re.MULTILINE | re.DOTALL)
    if not m:
        raise AssertionError(f"{path}: no process")
    name, body, functions = m.group(1), m.group(2), text[m.end() :]
    parts = re.split(rf"^    ({'|'.join(SECTIONS)}):\s*$", body, flags=re.MULTILINE)
    directives, sections = parts[0], dict(zip(parts[1::2], parts[2::2]))
    inputs = [
        _components(line)
        for line in sections["input"].splitlines()
        if line.strip() and not line.strip().startswith("//")
    ]
    outputs = []
    for line in sections["output"].splitlines():
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        emit = re.search(r"emit:\s*(\w+)", line)
        topic = re.search(r"topic:\s*(\w+)", line)
        decl = re.sub(r",\s*(emit|topic):.*$", "", line)
        decl = re.sub(r",\s*(emit|topic):\s*\w+", "", decl)
        outputs.append(
            Output(
                emit.group(1) if emit else "",
                _components(decl.removeprefix("tuple ")),
                topic.group(1) if topic else None,
                bool(re.search(r"optional:\s*true", line)),
            )
        )
    labels = re.findall(r"^\s*label\s+'([^']+)'", directives, re.MULTILINE)
    return Process(
        name, path, directives, inputs, outputs, sections["script"], sections.get("stub", ""), functions, labels
    )


def modules(root: Path = ROOT) -> dict[str, Process]:
    return {p.name: p for p in (parse_module(f) for f in sorted((root / "modules").rglob("main.nf")))}


def section_functions(path: Path) -> str:
    """The top-level ``def`` functions of a workflow file (everything after its last workflow)."""
    text = path.read_text()
    ends = [m.end() for m in re.finditer(r"^workflow \w+ \{\n.*?^\}\n", text, re.MULTILINE | re.DOTALL)]
    return text[ends[-1] :] if ends else text


def ext_args(config: Path = ROOT / "conf" / "modules.config") -> dict[str, str]:
    """``ext.args`` per process name from conf/modules.config (plain string values)."""
    text = config.read_text()
    return {
        name: args
        for name, args in re.findall(r"withName:\s*'(\w+)'\s*\{[^}]*?ext\.args\s*=\s*'([^']*)'", text, re.DOTALL)
    }


def groovy_literal(value) -> str:
    """A Python value (from JSON-able data) as a Groovy literal."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
        return "'" + escaped + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(groovy_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "[:]"
        return "[" + ", ".join(f"{groovy_literal(str(k))}: {groovy_literal(v)}" for k, v in value.items()) + "]"
    if isinstance(value, Path):
        return groovy_literal(str(value))
    raise TypeError(f"no Groovy literal for {type(value).__name__}")


# What Nextflow provides to scripts, closures and functions (and only that).
PRELUDE = r"""
import java.nio.file.*  // a default import of Nextflow scripts
ExpandoMetaClass.enableGlobally()
java.nio.file.Path.metaClass.exists = { -> java.nio.file.Files.exists(delegate) }
java.nio.file.Path.metaClass.getText = { -> new String(java.nio.file.Files.readAllBytes(delegate), 'UTF-8') }
java.nio.file.Path.metaClass.mkdirs = { -> delegate.toFile().mkdirs() }
java.nio.file.Path.metaClass.getBaseName = { ->
    def n = delegate.fileName.toString(); n.lastIndexOf('.') > 0 ? n.substring(0, n.lastIndexOf('.')) : n }

def file(p) { java.nio.file.Paths.get(p.toString()).toAbsolutePath().normalize() }
def error(String message) { throw new IllegalStateException(message) }
// Nextflow's `log`: warnings go to stderr, where the tests can read them
binding.setVariable('log', [warn: { String message -> System.err.println("WARN: " + message) }])
"""


class Groovy:
    """Evaluates Groovy snippets in one JVM per :meth:`evaluate` call."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def evaluate(self, jobs: list[tuple[dict, str, str]]) -> list:
        """Each job: (binding variables, functions source, expression); returns the values (JSON round trip).

        The functions and a closure holding the expression are compiled as their own script (as
        each Nextflow file is), with the variables in its binding (as process inputs and ``task``
        are), so the functions see ``params``/``workflow`` exactly as Nextflow's do.
        """
        pieces = ["import groovy.json.*", "def __results = []"]
        for i, (binding, functions, expression) in enumerate(jobs):
            source = PRELUDE + "\n" + functions + "\nreturn { ->\n" + expression + "\n}()\n"
            pieces.append(
                f"__results << new GroovyShell(new Binding({groovy_literal(binding)} as Map))"
                f".evaluate({groovy_literal(source)}, 'job{i}.groovy')"
            )
        pieces.append("println JsonOutput.toJson(__results.collect { it instanceof GString ? it.toString() : it })")
        return json.loads(run_groovy("\n".join(pieces), self.workdir).strip().splitlines()[-1])

    def render(self, process: Process, inputs: dict, task: dict, engine: str = "docker") -> dict:
        """The task's script, stub and containerOptions for these input values."""
        binding = {
            **inputs,
            "task": task,
            "workflow": {"containerEngine": engine},
            "moduleDir": str(process.path.parent),
        }
        jobs = [
            (binding, process.functions, process.script),
            (binding, process.functions, process.stub),
            (binding, process.functions, f'"${{{process.container_options}}}"'),
        ]
        script, stub, options = self.evaluate(jobs)
        return {"script": script, "stub": stub, "containerOptions": options}

    def render_directives(self, process: Process, inputs: dict, task: dict, names: list[str]) -> dict:
        """Directives (``cpus``, ``memory``, ``container``, ...) evaluated with these input values: a
        closure is called, a GString rendered, as Nextflow does for dynamic directives."""
        binding = {**inputs, "task": task, "workflow": {"containerEngine": "docker"}, "moduleDir": str(process.path.parent)}
        jobs = []
        for name in names:
            value = process.directive(name)
            assert value is not None, f"{process.name} has no {name} directive"
            jobs.append((binding, process.functions, f"def __v = {value}\nreturn __v instanceof Closure ? __v() : __v.toString()"))
        return dict(zip(names, self.evaluate(jobs)))

    def render_tasks(self, tasks: list[tuple[Process, dict, dict]], engine: str = "docker") -> list[dict]:
        """Many tasks of any processes in one JVM: each (process, inputs, task) gives its script, stub,
        containerOptions and ``outputs``, its declared path outputs rendered as Nextflow renders them
        (``"${meta.id}.h5"`` with the task's inputs) as {declared: rendered}."""
        jobs = []
        for process, inputs, task in tasks:
            binding = {
                **inputs,
                "task": task,
                "workflow": {"containerEngine": engine},
                "moduleDir": str(process.path.parent),
            }
            names = "[" + ", ".join(f'"{name}"' for name in process.path_outputs) + "]"
            jobs.append((binding, process.functions, process.script))
            jobs.append((binding, process.functions, process.stub))
            jobs.append((binding, process.functions, f'"${{{process.container_options}}}"'))
            jobs.append((binding, process.functions, names))
        values = self.evaluate(jobs)
        rendered = []
        for i, (process, _inputs, _task) in enumerate(tasks):
            script, stub, options, names = values[4 * i : 4 * i + 4]
            rendered.append(
                {
                    "script": script,
                    "stub": stub,
                    "containerOptions": options,
                    "outputs": dict(zip(process.path_outputs, names)),
                }
            )
        return rendered

    def render_many(
        self, process: Process, tasks: list[tuple[dict, dict]], engines=("docker", "singularity")
    ) -> list[dict]:
        """:meth:`render` for many (inputs, task) pairs in one JVM; containerOptions per engine."""
        jobs = []
        for inputs, task in tasks:
            for engine in engines:
                binding = {
                    **inputs,
                    "task": task,
                    "workflow": {"containerEngine": engine},
                    "moduleDir": str(process.path.parent),
                }
                if engine == engines[0]:
                    jobs.append((binding, process.functions, process.script))
                    jobs.append((binding, process.functions, process.stub))
                jobs.append((binding, process.functions, f'"${{{process.container_options}}}"'))
        values = self.evaluate(jobs)
        step = 2 + len(engines)
        rendered = []
        for i in range(len(tasks)):
            chunk = values[i * step : (i + 1) * step]
            rendered.append({"script": chunk[0], "stub": chunk[1], "containerOptions": dict(zip(engines, chunk[2:]))})
        return rendered
