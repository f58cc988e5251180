"""Compare what vllm-specextend touches in the installed vLLM with another
vLLM's sources (a wheel, or an unpacked source tree), without installing it.

Checked, from the sources alone:
- every patch target in `vllm_glue.registry.PATCHES`: present, signature
  the same, body the same or changed (a changed body is for a person to
  read: `--show-changed` prints the difference);
- every name the package imports from vLLM (`from vllm.x import y`): the
  module exists and defines it;
- every attribute the package reads off vLLM's proposer, model runner,
  input batch and metadata (`proposer.x`, `runner.x`, `batch.x`, `cad.x`,
  ...): still assigned (`self.x = ...`) or defined in the class's source
  file. The whole package is read, not only the glue: the core takes some
  of vLLM's objects as arguments (a drafting round reads the draft's
  attention metadata, `cad`).

Usage: python scripts/compare_vllm_sources.py vllm-0.33.0-...whl [--show-changed]
Exit status 1 when anything is missing or a signature differs.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_specextend"
# Objects of vLLM's the package reads attributes off, and the files that define them.
ATTRIBUTE_OWNERS = {
    "proposer": ("vllm/v1/spec_decode/llm_base_proposer.py", "vllm/v1/spec_decode/draft_model.py",
                 "vllm/v1/spec_decode/eagle.py"),
    "runner": ("vllm/v1/worker/gpu_model_runner.py",),
    "batch": ("vllm/v1/worker/gpu_input_batch.py",),
    "input_batch": ("vllm/v1/worker/gpu_input_batch.py",),
    "cad": ("vllm/v1/attention/backend.py",),
    "metadata": ("vllm/v1/attention/backend.py", "vllm/v1/sample/metadata.py"),
    "cache_config": ("vllm/config/cache.py",),
    "scheduler_output": ("vllm/v1/core/sched/output.py",),
}
# Glue files whose classes subclass one of those objects: their `self`.
SUBCLASSES = {"vllm_glue/proposer.py": "proposer"}
# The glue's subclasses of vLLM's classes (their file, vLLM's module and
# base class): the methods they override.
OVERRIDDEN = {"vllm_glue/proposer.py": ("vllm.v1.spec_decode.llm_base_proposer",
                                         "SpecDecodeBaseProposer")}
SUBCLASS_ROOTS = ("SpecExtendProposer",)
# vLLM's constructors the glue calls (building its proposers).
CONSTRUCTED = [("vllm.v1.spec_decode.draft_model", "DraftModelProposer.__init__"),
               ("vllm.v1.spec_decode.eagle", "EagleProposer.__init__")]


class Sources:
    """vLLM's .py files, from a wheel or a folder holding `vllm/`."""

    def __init__(self, location: Path):
        self.location = location
        self.archive = zipfile.ZipFile(location) if location.suffix == ".whl" else None
        self.names = set(self.archive.namelist()) if self.archive else None

    def read(self, name: str) -> str | None:
        if self.archive is not None:
            return self.archive.read(name).decode() if name in self.names else None
        path = self.location / name
        return path.read_text() if path.is_file() else None

    def module(self, dotted: str) -> str | None:
        base = dotted.replace(".", "/")
        return self.read(f"{base}.py") or self.read(f"{base}/__init__.py")


def find(source: str, qualname: str) -> ast.AST | None:
    node: ast.AST = ast.parse(source)
    for part in qualname.split("."):
        matches = [child for child in ast.iter_child_nodes(node)
                   if getattr(child, "name", None) == part]
        if not matches:
            return None
        node = matches[-1]
    return node


def defines(sources: "Sources", module: str, name: str) -> bool:
    """A module-level def, class, assignment or import of `name` (through
    `from .x import *`)."""
    source = sources.module(module)
    if source is None:
        return False
    is_package = sources.read(f"{module.replace('.', '/')}/__init__.py") is not None
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.names[0].name == "*":
            base = package if node.level else ""
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = ".".join(part for part in (base, node.module) if part)
            if defines(sources, target, name):
                return True
        if getattr(node, "name", None) == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name).split(".")[0] == name for alias in node.names):
                return True
        if isinstance(node, ast.If | ast.Try):  # names defined under TYPE_CHECKING or try
            if name in ast.unparse(node):
                return True
    return False


def package_sources() -> dict[str, str]:
    """Every file of the package, by its path in it."""
    return {path.relative_to(PACKAGE).as_posix(): path.read_text()
            for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(sources: dict[str, str]) -> set[tuple[str, str]]:
    names = set()
    for source in sources.values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm."):
                names.update((node.module, alias.name) for alias in node.names)
    return names


def defines_attribute(sources: "Sources", owner: str, attribute: str) -> bool:
    texts = [sources.read(name) or "" for name in ATTRIBUTE_OWNERS[owner]]
    return any(re.search(rf"(self\.{attribute}\b|def {attribute}\b|^\s+{attribute}\s*:)",
                         text, re.M) for text in texts)


def read_attributes(sources: dict[str, str], installed: "Sources") -> set[tuple[str, str]]:
    """Attributes the package reads off vLLM's objects; in the glue's subclasses
    of them (`SUBCLASSES`), `self.` attributes that the installed vLLM
    defines. What a subclass defines and vLLM does not is the glue's own."""
    # A name, or one of `self`'s or a vLLM config's, not an attribute of
    # something else (Triton's `compiled.metadata`).
    pattern = re.compile(r"(?:(?<![.\w])|(?<=self\.)|(?<=_config\.))("
                         + "|".join(ATTRIBUTE_OWNERS) + r")\.([A-Za-z_]\w*)\b")
    pairs, ours = set(), set()
    for file_name, source in sources.items():
        pairs.update(pattern.findall(source))
        if owner := SUBCLASSES.get(file_name):
            pairs.update((owner, name) for name in re.findall(r"\bself\.([A-Za-z_]\w*)", source)
                         if defines_attribute(installed, owner, name))
            own_names = re.findall(
                r"(?:\bself\.([A-Za-z_]\w*)\s*(?::[^=\n]*)?=[^=]|def ([A-Za-z_]\w*))", source)
            ours.update((owner, assigned or defined) for assigned, defined in own_names)
    return {(owner, name) for owner, name in pairs if not name.startswith("specextend")
            and ((owner, name) not in ours or defines_attribute(installed, owner, name))}


def overridden_methods(sources: dict[str, str]) -> list[tuple[str, str]]:
    """(module, qualname) of vLLM's methods that the glue's subclasses
    override (their signatures are what vLLM calls ours with) and of the
    constructors it calls."""
    methods = list(CONSTRUCTED)
    for file_name, (module, base) in OVERRIDDEN.items():
        for node in ast.walk(ast.parse(sources[file_name])):
            if isinstance(node, ast.ClassDef) and node.name in SUBCLASS_ROOTS:
                methods += [(module, f"{base}.{child.name}") for child in node.body
                            if isinstance(child, ast.FunctionDef) and child.name != "__init__"]
    return methods


def compare(installed: Sources, other: Sources, show_changed: bool) -> list[str]:
    sys.path.insert(0, str(PACKAGE.parent))
    from vllm_specextend.vllm_glue.registry import PATCHES

    sources = package_sources()
    problems, report = [], []
    targets = [(patch.module, patch.qualname, patch.adds) for patch in PATCHES]
    for module, qualname in overridden_methods(sources):
        if (source := installed.module(module)) and find(source, qualname) is not None:
            targets.append((module, qualname, False))
    for module, qualname, adds in targets:
        mine, theirs = installed.module(module), other.module(module)
        label = f"{module}:{qualname}"
        if adds:
            owner = qualname.rsplit(".", 1)[0]
            found = theirs is not None and find(theirs, owner) is not None
            report.append(f"{'ok' if found else 'MISSING':9s} {label} (added to {owner})")
            problems += [] if found else [label]
            continue
        old = find(mine, qualname) if mine else None
        new = find(theirs, qualname) if theirs else None
        if new is None:
            report.append(f"MISSING   {label}")
            problems.append(label)
            continue
        same_signature = ast.dump(old.args) == ast.dump(new.args)
        same_body = ast.dump(old) == ast.dump(new)
        report.append(f"{'ok' if same_signature else 'SIGNATURE':9s} {label}: body "
                      f"{'the same' if same_body else 'changed'}")
        problems += [] if same_signature else [label]
        if show_changed and not same_body:
            report.extend("    " + line for line in difflib.unified_diff(
                ast.unparse(old).splitlines(), ast.unparse(new).splitlines(), lineterm="", n=1))
    for module, name in sorted(imported_names(sources)):
        if not (defines(other, module, name) or other.module(f"{module}.{name}")):
            report.append(f"MISSING   import {name} from {module}")
            problems.append(f"{module}.{name}")
    checked = 0
    for owner, attribute in sorted(read_attributes(sources, installed)):
        if not defines_attribute(other, owner, attribute):
            report.append(f"MISSING   attribute {owner}.{attribute}")
            problems.append(f"{owner}.{attribute}")
        checked += 1
    report.append(f"{len(PATCHES)} patch targets, {len(targets) - len(PATCHES)} overridden "
                  f"methods and constructors, {len(imported_names(sources))} imported "
                  f"names, {checked} attributes checked; {len(problems)} problems")
    print("\n".join(report))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="a vLLM wheel, or a folder holding vllm/")
    parser.add_argument("--installed", type=Path, default=None,
                        help="the reference sources (default: the installed vLLM)")
    parser.add_argument("--show-changed", action="store_true")
    args = parser.parse_args(argv)
    if args.installed is None:
        import importlib.util

        args.installed = Path(importlib.util.find_spec("vllm").origin).parents[1]
    return 1 if compare(Sources(args.installed), Sources(args.other), args.show_changed) else 0


if __name__ == "__main__":
    sys.exit(main())
