"""docs/design.md's rules that a reader can check by looking: where communication and devices live; how the
benchmarks share code."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = [p for d in ("sp_core", "adapters") for p in (ROOT / d).rglob("*.py")]


def _code(path):
    return path.read_text()


# the launcher makes each rank's process group (its store, init_process_group) and the barrier before a rank ends
DISTRIBUTED_ALLOWED = ("sp_core/procs/launch.py",)


def test_torch_distributed_only_in_mpu():
    offenders = [str(p.relative_to(ROOT)) for p in LIBRARY
                 if "sp_core/mpu/" not in str(p) and not str(p).endswith(DISTRIBUTED_ALLOWED)
                 and re.search(r"torch\.distributed|\bdist\.", _code(p))]
    assert not offenders, f"torch.distributed used outside sp_core/mpu and {DISTRIBUTED_ALLOWED}: {offenders}"


# platform picks the device, kernels/lookup the fused kernel per device; sp_core_megatron.cli_engine.cpu_training
# exists to redirect megatron-core's own CUDA calls on a CPU machine: it has to name what it redirects.
CUDA_ALLOWED = ("sp_core/mpu/platform.py", "sp_core/kernels/lookup.py", "adapters/megatron/cli_engine/cpu_training.py",
                "sp_core/settings.py",  # settings.py: the values SP_CORE_DEVICE accepts
                "sp_core/procs/cuda_ipc.py")  # the refit's CUDA IPC transport: CUDA's own mechanism, nothing else has it


def test_cuda_named_only_in_platform():
    pattern = re.compile(r"\.cuda\(|[\"']cuda[\"':]|torch\.cuda\b")
    offenders = [str(p.relative_to(ROOT)) for p in LIBRARY
                 if not str(p).endswith(CUDA_ALLOWED) and pattern.search(_code(p))]
    assert not offenders, f"CUDA named outside {CUDA_ALLOWED}: {offenders}"


def test_core_never_imports_the_frameworks():
    pattern = re.compile(r"^\s*(from|import)\s+(megatron|sglang|sp_core_megatron|sp_core_sglang)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "sp_core").rglob("*.py") if pattern.search(_code(p))]
    assert not offenders, offenders


def test_model_files_have_no_collectives():
    for name in ("qwen.py", "deepseek.py"):
        text = (ROOT / "sp_core" / "models" / name).read_text()
        assert not re.search(r"mpu|collectives|all_reduce|all_gather|reduce_scatter", text), name


def test_library_never_reaches_into_tests():
    """The published package has no tests/: no library module may import from it or put it on a path."""
    pattern = re.compile(r"^\s*(from|import)\s+(tests|support)\b|[\"'/]tests[\"'/]|\btests/support\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in LIBRARY if pattern.search(_code(p))]
    assert not offenders, f"library modules referring to tests/: {offenders}"


def test_library_files_are_packaged():
    """Every library directory with Python files is in pyproject's package list (a wheel ships it)."""
    import tomllib

    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {"sp_core": ROOT / "sp_core", "sp_core_megatron": ROOT / "adapters" / "megatron",
             "sp_core_sglang": ROOT / "adapters" / "sglang"}
    missing = []
    for name, root in roots.items():
        for d in sorted({p.parent for p in root.rglob("*.py")}):
            package = ".".join([name, *d.relative_to(root).parts])
            if package not in packages:
                missing.append(package)
    assert not missing, f"not in pyproject's [tool.setuptools] packages: {missing}"


def test_documentation_links_resolve_inside_the_repository():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for target in link.findall(doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            if not (path.exists() and ROOT in path.parents):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, f"links that do not resolve inside the repository: {broken}"


def test_setup_installs_what_the_test_extra_declares():
    """scripts/setup.sh (CI's set-up) installs every package the test extra names."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {re.split(r"[<>=\[ ]", req)[0] for name in ("test", "verify") for req in extras[name]} - {"sp-core"}
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    missing = [name for name in sorted(wanted) if not re.search(rf"\b{re.escape(name)}\b", setup)]
    assert not missing, f"scripts/setup.sh does not install {missing}"


def test_the_activity_board_is_entered_in_one_place():
    """Only door.start marks a rank as waiting in a collective (every caller leaves in a finally);
    a collective that entered and never left made the hang detector kill a working run."""
    callers = {str(p.relative_to(ROOT)): len(re.findall(r"\benter_collective\(", _code(p))) for p in LIBRARY}
    callers = {name: n for name, n in callers.items() if n and not name.endswith("mpu/activity.py")}
    assert callers == {"sp_core/mpu/door.py": 1, "sp_core/procs/launch.py": 1}, callers


def _benchmark_imports() -> dict:
    """{benchmark module: [(imported benchmarks module, names taken from it), ...]} over benchmarks/**.py."""
    import ast

    found = {}
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("benchmarks"):
                names = [a.name for a in node.names]
                if node.module == "benchmarks":  # from benchmarks import megatron_bench
                    edges += [(f"benchmarks.{n}", []) for n in names]
                else:
                    edges.append((node.module, names))
            elif isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names if a.name.startswith("benchmarks.")]
        found[module] = edges
    return found


def test_benchmarks_run_as_modules_without_path_edits():
    """Every benchmark runs as ``python -m benchmarks.NAME`` from the repository root: none edits sys.path."""
    edits = [str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").rglob("*.py") if "sys.path" in _code(p)]
    assert not edits, f"benchmarks that edit sys.path: {edits}"


def test_benchmarks_share_through_common_without_circles_or_privates():
    """What benchmarks share lives in benchmarks/common.py: no benchmark takes another's ``_private`` name
    (``from benchmarks.x import _y`` or ``x._y``), and their imports form no circle."""
    graph = _benchmark_imports()
    privates = [f"{m}: {target}.{n}" for m, edges in graph.items() for target, names in edges for n in names
                if n.startswith("_")]
    for path in (ROOT / "benchmarks").rglob("*.py"):
        for target in {t.rsplit(".", 1)[-1] for edges in graph.values() for t, _ in edges} - {"common"}:
            privates += [f"{path.relative_to(ROOT)}: {target}.{n}"
                         for n in re.findall(rf"\b{re.escape(target)}\.(_\w+)", _code(path))]
    assert not privates, f"benchmarks that take another benchmark's private names: {privates}"
    circles, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for target, _ in graph.get(module, ()):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target in graph and target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not circles, f"circles among the benchmarks' imports: {circles}"


# The CLI engines' launchers set the environment of the processes they start (sglang's workers read it there).
ENV_PLUMBING = ("cpu_env.py", "engine.py", "engine_process.py")
_ENV_READ = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=)")
_SP_CORE_READ = re.compile(r"(os\.environ\.get|os\.getenv)\(\s*[\"']SP_CORE_")


def _env_readers(files) -> list:
    out = []
    for p in files:
        name = str(p.relative_to(ROOT))
        if name == "sp_core/settings.py" or "cpu_backend" in name or p.name in ENV_PLUMBING:
            continue
        text = _code(p)
        if (_ENV_READ if name.startswith("sp_core/") else _SP_CORE_READ).search(text):
            out.append(name)
    return out


def test_environment_is_read_in_the_settings_module_only():
    """Every SP_CORE_* setting is read in sp_core/settings.py (once; a context keeps what it was made with);
    the core reads no other variable either."""
    assert not _env_readers(LIBRARY), f"environment read outside sp_core/settings.py: {_env_readers(LIBRARY)}"


def test_environment_rule_catches_a_read(tmp_path):
    """Negative control: the rule flags a module that reads a setting itself, as platform.py did."""
    probe = ROOT / "sp_core" / "_probe_env_read.py"
    probe.write_text('import os\nFUSED = os.environ.get("SP_CORE_FUSED", "1")\n')
    try:
        assert _env_readers([probe]) == ["sp_core/_probe_env_read.py"]
    finally:
        probe.unlink()


_ROUTE_OR_FORM = re.compile(r"\b(deterministic|communicator|gloo|ring|symm_mem|copy_engine|invariant)\b|"
                            r"==\s*[\"'](ring|split|symm_mem|copy_engine|off)[\"']")


def test_collectives_do_not_branch_on_routes_or_forms():
    """mpu/collectives.py hands the sums and gathers to the context's route and the fused GEMMs to its async-TP
    form: it names neither (routes/ and async_tp/ hold one route or form per file)."""
    code = "\n".join(line.split("#")[0] for line in _code(ROOT / "sp_core" / "mpu" / "collectives.py").splitlines()
                     if not line.lstrip().startswith(("\"\"\"", "``")))
    body = code.split('"""', 2)[-1]  # past the module docstring
    found = sorted(set(m.group(0) for m in _ROUTE_OR_FORM.finditer(body)))
    assert not found, f"collectives.py names routes or forms: {found}"
    old_style = 'if impl == "split" and b.shape[-1] % 2 != 0:\n    if ps.deterministic():'
    assert _ROUTE_OR_FORM.search(old_style)  # negative control: the branches the file once had


# The rooms of sp_core, lowest first: a module imports from its own room and the rooms below it, never from one
# above. settings (every SP_CORE_* setting) sits under everything; procs (starting and supervising ranks) needs
# mpu only and is used by models (checkpoint's remove_on_abort) and the application. Modules at sp_core's root
# other than settings count as the application, as sp_core/app/ does (the command lived there before it moved).
ROOMS = ("settings", "mpu", "procs", "kernels", "layers", "models", "app")
# Upward imports known today, each to be removed (the test fails when one disappears, so the list shrinks):
KNOWN_UPWARD: set = set()  # none left; an entry here would have to say why


def _room(module: str):
    """The room of a module of sp_core (None for the package sp_core itself)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in ROOMS else "app"


def _sp_core_sources(root=ROOT) -> dict:
    """{module name: source} for every sp_core/**.py under ``root``."""
    sources = {}
    for path in sorted((root / "sp_core").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        sources[module] = path.read_text()
    return sources


def _imports(sources: dict) -> dict:
    """{module: [(imported sp_core module, module_level), ...]}. ``from a.b import c`` names the module a.b.c
    where c is one, else a.b; relative imports are resolved. module_level: the import runs when the module is
    imported (not inside a function); the packages above an imported module are not counted."""
    import ast

    packages = {m for m in sources if any(k.startswith(m + ".") for k in sources)} | {"sp_core"}
    found = {}
    for module, source in sources.items():
        edges = []

        def visit(node, module_level):
            for child in ast.iter_child_nodes(node):
                inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    edges.extend((a.name, inner) for a in child.names if a.name.split(".")[0] == "sp_core")
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        here = module if module in packages else module.rsplit(".", 1)[0]
                        here = here.rsplit(".", child.level - 1)[0] if child.level > 1 else here
                        base = f"{here}.{base}" if base else here
                    if base.split(".")[0] == "sp_core":
                        edges.extend((f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base, inner)
                                     for a in child.names)
                visit(child, inner)

        visit(ast.parse(source), True)
        found[module] = edges
    return found


def layering_violations(sources: dict) -> set:
    """{(importer, imported)}: imports, at module level or inside a function, from a lower room to a higher."""
    rank = {room: i for i, room in enumerate(ROOMS)}
    return {(m, target) for m, edges in _imports(sources).items() for target, _ in edges
            if _room(m) and _room(target) and rank[_room(target)] > rank[_room(m)]}


def import_circles(sources: dict) -> list:
    """Circles among module-level imports (an import inside a function runs later and closes no circle)."""
    graph = {m: sorted({t for t, module_level in edges if module_level and t in sources and t != m})
             for m, edges in _imports(sources).items()}
    circles, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    return circles


def test_rooms_import_downward_only():
    """mpu < procs < kernels < layers < models < app (settings below all): no room imports from a higher one,
    at module level or inside a function; the known exceptions are listed in KNOWN_UPWARD."""
    found = layering_violations(_sp_core_sources())
    assert found - KNOWN_UPWARD == set(), f"imports from a lower room to a higher one: {sorted(found - KNOWN_UPWARD)}"
    assert KNOWN_UPWARD <= found, f"no longer imported, remove from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - found)}"


def test_no_import_circles_in_sp_core():
    """No circle among sp_core's module-level imports."""
    circles = import_circles(_sp_core_sources())
    assert not circles, f"circles among sp_core's module-level imports: {circles}"


def test_the_room_rules_catch_what_they_forbid():
    """Negative controls: platform importing a Triton kernel inside a function (as it did before the kernels
    room) is upward; mpu and layers importing each other at module level is a circle, and inside a function
    it is not."""
    sources = _sp_core_sources()
    sources["sp_core.mpu.platform"] += "\n\ndef _kernel():\n    from sp_core.kernels import triton_kernels\n"
    assert ("sp_core.mpu.platform", "sp_core.kernels.triton_kernels") in layering_violations(sources)
    sources["sp_core.mpu.grads"] += "\nfrom sp_core.layers import norm\n"
    sources["sp_core.layers.norm"] += "\nfrom sp_core.mpu import grads\n"
    assert any("sp_core.mpu.grads" in c and "sp_core.layers.norm" in c for c in import_circles(sources))
    sources["sp_core.mpu.grads"] = sources["sp_core.mpu.grads"].replace(
        "\nfrom sp_core.layers import norm\n", "\ndef _late():\n    from sp_core.layers import norm\n")
    assert not import_circles(sources)
