"""The import graph of skyguard/ (issue 16: "no cycle and no import from a lower layer to a higher
one"), read from the source with `ast`, nothing imported: every `import` and `from ... import`,
at module level, under `if TYPE_CHECKING:` and inside functions alike (a deferred import is still
a dependency), relative ones resolved against the importing module's package.

Every module belongs to a unit: the longest entry of LAYERS that prefixes its dotted name (a
subpackage such as "credproxy", a top-level module such as "daemon", or one module a lower layer
may use on its own, such as "datapath.abi"). A unit may import units of its own layer and of any
layer below; the units must not import each other in a cycle, whatever their layers. Edges that
break either rule today are in ALLOWED, each with why and the fix; an ALLOWED edge the code no
longer has fails the test too, so the list only shrinks.

Root-free and fast: it parses every file of skyguard/ once.
"""

from __future__ import annotations

import ast
import functools
import gc
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "skyguard"

# Bottom first. What each layer may import: itself and the layers above it in this list.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Foundation: no skyguard imports but each other. The package root, the one error root, paths
    # and defaults, file helpers, an await bounded in time (timeouts), HTTP content codings and
    # forwarding headers, the threads that work on large HTTP bodies off the event loop
    # (bodywork) and those of a part's blocking file work (diskwork), the result of a doctor
    # check (which parts' own checks return); the numbers shared with bpf/abi.h and the C text of bpf/ (which the TPM
    # measures and the loader compiles); the key names and key errors the policy checks (no token
    # or file access in keys.types).
    ("foundation", ("skyguard", "errors", "config", "fsutil", "timeouts", "httpcodings", "httpheaders", "bodywork",
                    "diskwork", "conncap", "checks",
                    "datapath.abi", "datapath.source", "keys.types")),
    # The policy as values: parsed, validated, immutable; what every part consumes.
    ("policy", ("policy",)),
    # Services the parts stand on, each knowing the policy at most: the part interface (parts.py),
    # the signed log, the sealed store (custody: a leaf, issue 16), the TPM, the Prometheus
    # exporter, the control socket, the lab the tests and demo build from a policy, and the
    # programs run inside lab VMs. Two modules of keys/ too: the PKCS#11 token (keys.pkcs11) and
    # token keys in TLS contexts (keys.tlskey, with the ClientCertificate value), which the
    # credential proxy uses for upstream mTLS and TLS termination; the crypto proxy (the rest of
    # keys/) stands above credproxy.
    ("services", ("parts", "tlog", "custody", "tpm", "metrics", "control", "lab", "vmtools",
                  "keys.pkcs11", "keys.tlskey")),
    # Shared by several parts: the content filter's judging (HTTP bodies in the credential proxy,
    # SFTP uploads in the SSH access proxy) and the datapath (BPF programs, maps, flow log), which
    # the DNS proxy steers through and the crypto proxy shares addresses with.
    ("part libraries", ("content", "datapath")),
    # The parts the daemon hosts (skyguard/parts.py shape): DNS proxy, credential proxy and TLS
    # termination, SSH access proxy, and the fleet's policy distribution.
    ("parts", ("dns", "credproxy", "admin", "fleet")),
    # Parts built on other parts: the web console (the access proxy's access checks and session
    # archive), the identity-aware app proxy and the crypto proxy (the credential proxy's HTTP/1
    # framing, TLS contexts, sockets and fairness).
    ("composite parts", ("console", "apps", "keys")),
    # The whole product: the daemon hosting the parts, its checks (doctor), attestation, the names
    # the sealed store holds for every part (storenames), the demo and the attack arena.
    ("product", ("daemon", "daemon_apply", "doctor", "attest", "storenames", "demo", "attack")),
    # The command line: the one place that may import anything.
    ("cli", ("cli",)),
]

# Edges (importing module, imported module) that break the layers or close a cycle, while they
# last: each with why it is there and what removes it; fixing one means deleting its line here.
ALLOWED: dict[tuple[str, str], str] = {}  # none left (the last four went in issue 16)


def parse(path: Path) -> ast.Module:
    """ast.parse with the garbage collector held off. CPython 3.11 before 3.11.5 (gh-106905): a
    finalizer run by a collection inside ast.parse that itself parses (a leftover asyncio task's
    "exception was never retrieved" traceback: 3.11's traceback module parses source for its
    carets) breaks the AST constructor's recursion count: SystemError. Seen in CI."""
    gc.disable()
    try:
        return ast.parse(path.read_text(encoding="utf-8"), str(path))
    finally:
        gc.enable()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The skyguard modules `name` imports anywhere in its source (packages count as their
    __init__; `from pkg import mod` as pkg.mod when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..a import b
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {m for m in found if m in modules and m != name}


def unit_of(module: str) -> str:
    """The LAYERS entry that holds `module` (longest dotted prefix), or "" for none."""
    rest = module.removeprefix("skyguard").removeprefix(".")
    units = [u for _, us in LAYERS for u in us if u != "skyguard"]
    matches = [u for u in units if rest == u or rest.startswith(u + ".")]
    if matches:
        return max(matches, key=len)
    return "skyguard" if module == "skyguard" else ""


def layer_index() -> dict[str, int]:
    return {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


@functools.cache  # one parse for every test of the run
def unit_edges() -> tuple[dict[tuple[str, str], list[tuple[str, str]]], set[tuple[str, str]]]:
    """{(from unit, to unit): [(module, imported module), ...]} across units, ALLOWED edges
    left out; and which ALLOWED edges the code still has."""
    modules = all_modules()
    edges: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    allowed_seen = set()
    for name, path in modules.items():
        for target in sorted(imports_of(name, path, modules)):
            a, b = unit_of(name), unit_of(target)
            if a == b:
                continue
            if (name, target) in ALLOWED:
                allowed_seen.add((name, target))
                continue
            edges[(a, b)].append((name, target))
    return edges, allowed_seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_has_a_layer():
    lost = sorted(m for m in all_modules() if not unit_of(m))
    assert not lost, (f"modules in no layer: {lost}; add their subpackage (or top-level module) to LAYERS in "
                      f"{Path(__file__).name}, in the layer of what it imports and what imports it")
    units = [u for _, us in LAYERS for u in us]
    assert len(units) == len(set(units)), "a unit is in two layers"


def test_no_lower_layer_imports_a_higher_one():
    edges, _ = unit_edges()
    layer = layer_index()
    upward = [f"  {a} ({LAYERS[layer[a]][0]}) -> {b} ({LAYERS[layer[b]][0]}): "
              + ", ".join(f"{m} imports {t}" for m, t in found)
              for (a, b), found in sorted(edges.items()) if layer[a] < layer[b]]
    assert not upward, ("imports from a lower layer to a higher one (layers: LAYERS in "
                        f"{Path(__file__).name}):\n" + "\n".join(upward))


def test_no_import_cycle_between_units():
    edges, _ = unit_edges()
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    cycle = find_cycle(graph)
    if cycle:
        links = [f"  {a} -> {b}: " + ", ".join(f"{m} imports {t}" for m, t in edges[(a, b)])
                 for a, b in zip(cycle, cycle[1:])]
        raise AssertionError(f"import cycle {' -> '.join(cycle)}:\n" + "\n".join(links))


def test_allowed_edges_still_exist():
    _, seen = unit_edges()
    gone = sorted(set(ALLOWED) - seen)
    assert not gone, f"ALLOWED lists imports the code no longer has; delete them: {gone}"


def test_the_checker_sees_what_it_must():
    """The parser itself: relative imports, deferred and TYPE_CHECKING imports, and a cycle."""
    modules = all_modules()
    name = "skyguard.admin.sftp"
    assert "skyguard.content.inspector" in imports_of(name, modules[name], modules)  # inside a method
    assert "skyguard.parts" in imports_of(name, modules[name], modules)  # under TYPE_CHECKING
    assert unit_of("skyguard.datapath.abi") == "datapath.abi" and unit_of("skyguard.datapath.maps") == "datapath"
    assert unit_of("skyguard") == "skyguard" and unit_of("skyguard.config") == "config"
    assert unit_of("skyguard.keys.tlskey") == "keys.tlskey" and unit_of("skyguard.keys.proxy") == "keys"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None


# ---- the rest of issue 16's "done when": file length, and tests use only public names ----------

MAX_LINES = 600


def test_no_file_of_skyguard_is_over_600_lines():
    long = {name: n for name, path in all_modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these at a seam (at most {MAX_LINES} lines each): {long}"


def test_no_test_or_benchmark_imports_a_private_name_of_skyguard():
    """`from skyguard.x import _name` (or `skyguard.x._name`) ties a test to an implementation
    detail: make the name public where the test needs it."""
    found = []
    for path in sorted((PACKAGE.parent / "tests").rglob("*.py")) + sorted((PACKAGE.parent / "bench").rglob("*.py")):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skyguard"):
                found += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and a.name != "__version__"]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "skyguard":
                    found.append(f"{path.name}:{node.lineno} skyguard...{node.attr}")
    assert not found, f"tests and benchmarks use skyguard's private names: {found}"
