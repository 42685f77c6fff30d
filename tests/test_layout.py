"""The package's import graph (read from the sources with ast): no cycle, the contract and box maths below the
families, the generic stages reaching a family only through the contract and the zoo."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "ssdlite_jax"
FAMILIES = ("ssdlite_jax.ssd", "ssdlite_jax.rcnn")  # family packages
BELOW_FAMILIES = ("ssdlite_jax.detector", "ssdlite_jax.boxes", "ssdlite_jax.box_coder", "ssdlite_jax.dtypes",
                  "ssdlite_jax.models")           # the contract, box maths and networks the families build on
GENERIC = ("ssdlite_jax.detect", "ssdlite_jax.train_step", "ssdlite_jax.inference", "ssdlite_jax.loading",
           "ssdlite_jax.checkpoint", "ssdlite_jax.porting", "ssdlite_jax.training", "ssdlite_jax.evaluation")


def _modules():
  out = {}
  for path in (ROOT / PACKAGE).rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(name, path, known):
  """The package modules `name` imports anywhere in its file (function-level imports included), each import of a
  submodule also counting its parent packages as Python runs them."""
  found = set()
  is_package = path.name == "__init__.py"
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
      targets = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for t in targets:
      parts = t.split(".")
      found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in known)
  found.discard(name)
  return found


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _within(module, packages):
  return any(module == p or module.startswith(p + ".") for p in packages)


def test_graph_is_read():
  """The reader sees the edges that are known to exist (a broken reader would pass every test below)."""
  assert "ssdlite_jax.detector" in GRAPH["ssdlite_jax.train_step"]
  assert {"ssdlite_jax.ssd.losses", "ssdlite_jax.models.ssd"} <= GRAPH["ssdlite_jax.ssd.detector"]
  assert "ssdlite_jax.ssd.detector" in GRAPH["ssdlite_jax.zoo"]


def test_import_graph_has_no_cycle():
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(GRAPH[node]):
      if state.get(nxt) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(GRAPH):
    if node not in state:
      visit(node, [node])


@pytest.mark.parametrize("lower", BELOW_FAMILIES)
def test_contract_box_maths_and_networks_import_no_family(lower):
  bad = {(m, t) for m, targets in GRAPH.items() if _within(m, (lower,)) for t in targets
         if _within(t, FAMILIES + GENERIC + ("ssdlite_jax.zoo",))}
  assert not bad, f"upward imports: {sorted(bad)}"


def test_families_import_no_stage_above_them():
  bad = {(m, t) for m, targets in GRAPH.items() if _within(m, FAMILIES) for t in targets
         if _within(t, GENERIC + ("ssdlite_jax.zoo", "ssdlite_jax.export", "ssdlite_jax.cli"))}
  assert not bad, f"upward imports: {sorted(bad)}"


def test_generic_stages_reach_families_only_through_the_zoo():
  bad = {(m, t) for m, targets in GRAPH.items() if m in GENERIC for t in targets if _within(t, FAMILIES)}
  assert not bad, f"generic stages naming a family: {sorted(bad)}"
