"""The import layering of ldm_jax (DESIGN.md "Layout"): imports point one way, and nothing cycles.

Every module of the package is parsed with `ast` (nothing is imported); each import of an
ldm_jax module, at any depth (inside functions too), is mapped to its layer:

    config ← runtime ← nn ← models ← data | losses | diffusion ← convert ← load ← sampling | eval | precompute
    ← train
    ← entry points (`ldm_jax.demo`, every `__main__`)

A module may import its own package and any lower layer; packages that share a layer do not import
each other. No ldm_jax import sits inside a function (one placed there to dodge a cycle means the
layering is wrong), and an optional heavy third-party import inside a function says why in a
comment on its line.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ldm_jax")
LAYERS = (("config",), ("runtime",), ("nn",), ("models",), ("data", "losses", "diffusion"), ("convert",),
          ("load",), ("sampling", "eval", "precompute"), ("train",))
ENTRY_LAYER = len(LAYERS)


def _modules() -> dict[str, str]:
  """'ldm_jax.a.b' → file path, for every module of the package."""
  modules = {}
  for directory, _, names in os.walk(ROOT):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        parts = ["ldm_jax"] + os.path.relpath(path, ROOT)[:-3].split(os.sep)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


MODULES = _modules()


def package_of(module: str) -> str:
  """'ldm_jax.train.diffusion.step' → 'train'; the root package is ''."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int:
  if module == "ldm_jax.demo" or module.endswith(".__main__"):
    return ENTRY_LAYER
  package = package_of(module)
  return next(i for i, names in enumerate(LAYERS) if package in names)


def _resolve(module: str, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  is_package = MODULES[module].endswith("__init__.py")
  base = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
  return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str):
  """(imported ldm_jax module, line, inside a function) of every import in `module`; `from X import Y`
  counts as an import of X.Y when that is a module."""
  with open(MODULES[module], encoding="utf-8") as f:
    tree = ast.parse(f.read())
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((alias.name, child.lineno, in_function) for alias in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = _resolve(module, child)
        for alias in child.names:
          target = f"{base}.{alias.name}"
          found.append((target if target in MODULES else base, child.lineno, in_function))
      visit(child, inner)

  visit(tree, False)
  return found


def _graph() -> dict[str, set[str]]:
  return {m: {t for t, _, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_has_a_layer():
  for module in MODULES:
    if module != "ldm_jax":
      layer_of(module)  # StopIteration: a new package needs a place in LAYERS


def test_imports_point_down_the_layers():
  wrong = []
  for module in MODULES:
    if module == "ldm_jax":
      continue
    for target, line, _ in imports_of(module):
      if target not in MODULES or target == "ldm_jax" or package_of(target) == package_of(module):
        continue
      if layer_of(target) >= layer_of(module):
        wrong.append(f"{MODULES[module]}:{line}: {module} (layer {layer_of(module)}) imports {target} "
                     f"(layer {layer_of(target)})")
  assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_ldm_jax_import_inside_a_function():
  inside = [f"{MODULES[m]}:{line}: {t}" for m in MODULES for t, line, in_function in imports_of(m)
            if in_function and t.startswith("ldm_jax")]
  assert not inside, "ldm_jax imports inside functions (move the code, not the import):\n" + "\n".join(inside)


def test_third_party_imports_inside_functions_say_why():
  silent = []
  for module, path in MODULES.items():
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    for target, line, in_function in imports_of(module):
      if in_function and not target.startswith("ldm_jax"):
        text = lines[line - 1] + " " + lines[line - 2]
        if "#" not in text:
          silent.append(f"{path}:{line}: import {target}")
  assert not silent, "function-local imports without a comment saying why:\n" + "\n".join(silent)


def test_no_import_cycles():
  graph, state, stack, cycles = _graph(), {}, [], []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph[module]):
      if state.get(target) == "open":
        cycles.append(" → ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        visit(target)
    stack.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module)
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(
    os.path.join(d, n) for d, _, names in os.walk(os.path.join(os.path.dirname(ROOT), "configs"))
    for n in names if n.endswith(".py")))
def test_config_files_import_only_ldm_jax_config(path):
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    for name in names:
      assert not name.startswith(("jax", "flax", "optax", "orbax", "grain")), f"{path} imports {name}"
      if name.startswith("ldm_jax"):
        assert name == "ldm_jax.config" or name.startswith("ldm_jax.config."), f"{path} imports {name}"


def test_the_layering_itself_is_checked():
  """The checks see an import against the layering, inside functions too."""
  assert layer_of("ldm_jax.config.common") < layer_of("ldm_jax.runtime.sharding") < layer_of("ldm_jax.load")
  assert ("ldm_jax.runtime.sharding", 0, False) in {(t, 0, f) for t, _, f in imports_of("ldm_jax.sampling.run")}
  assert layer_of("ldm_jax.train.diffusion.trainer") > layer_of("ldm_jax.eval.evaluate")
  assert layer_of("ldm_jax.sampling.run") == layer_of("ldm_jax.eval.evaluate")
