"""Imports run one way: tensor -> formats -> layers -> the rest (planning, surgery, ADMM,
the pipeline, the cli). The formats know nothing of the layers: the layers register which
format they build (tdcompress.layers.registry)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tdcompress

SRC = Path(tdcompress.__file__).resolve().parent
#: each package, and what it may not import (at module level or inside functions)
LOWER = {
    "tensor": ("formats", "layers"),
    "formats": ("layers",),
}
ABOVE_LAYERS = (
    "planning",
    "surgery",
    "admm",
    "pipeline",
    "cli",
    "serialization",
    "export",
    "bench",
    "config",
    "report",
)
LOWER["layers"] = ABOVE_LAYERS


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``: module level, in functions, relative
    imports resolved, and importlib.import_module / __import__ of a constant name."""
    pkg = "tdcompress." + ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    pkg = pkg.rstrip(".")
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            out.append((node.lineno, node.args[0].value))
    return out


@pytest.mark.parametrize("package", sorted(LOWER))
def test_a_package_imports_nothing_above_it(package) -> None:
    banned = tuple(f"tdcompress.{m}" for m in LOWER[package])
    bad = [
        f"{path.relative_to(SRC)}:{line} imports {mod}"
        for path in sorted((SRC / package).rglob("*.py"))
        for line, mod in _imported(path)
        if any(mod == b or mod.startswith(b + ".") for b in banned)
    ]
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path) -> None:
    p = SRC / "formats" / "_probe_for_test.py"
    assert not p.exists()
    try:
        p.write_text("def f():\n    from ..layers import tt\n    import tdcompress.layers.lstm\n")
        assert [m for _, m in _imported(p)] == [
            "tdcompress.layers",
            "tdcompress.layers.tt",
            "tdcompress.layers.lstm",
        ]
    finally:
        p.unlink()


def test_the_formats_run_without_the_layers_in_a_fresh_interpreter() -> None:
    """Every format resolves, counts, projects and decomposes with tdcompress.layers never
    imported (the package's __init__, which imports everything, is skipped)."""
    code = textwrap.dedent(
        f"""
        import sys, types
        pkg = types.ModuleType("tdcompress")
        pkg.__path__ = [{str(SRC)!r}]
        sys.modules["tdcompress"] = pkg
        import torch
        import tdcompress.formats as F
        from tdcompress.formats import contraction, layouts  # noqa: F401
        from torch import nn
        lin = F.LayerGeometry.from_module(nn.Linear(48, 64))
        conv = F.LayerGeometry.from_module(nn.Conv2d(16, 32, 3))
        for name in F.available_formats():
            fmt = F.get_format(name)
            for g in (lin, conv):
                if g.kind not in fmt.kinds:
                    continue
                spec = fmt.resolve(g, 2)
                fmt.num_params(g, spec), fmt.macs(g, spec, (8, 8))
                ks = g.kernel_size if g.kind == "conv2d" else ()
                w = torch.randn(g.out_features, g.in_features, *ks)
                fmt.project(w, spec), fmt.decompose(w, spec)
        bad = sorted(m for m in sys.modules if m.startswith("tdcompress.layers"))
        assert not bad, bad
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(SRC.parent))
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_the_layers_register_the_format_they_build() -> None:
    from tdcompress import layers
    from tdcompress.formats import LayerGeometry, get_format
    from tdcompress.layers import registry

    assert set(layers.layer_classes()) == {
        "TTLinear",
        "TTConv2d",
        "TRLinear",
        "TRConv2d",
        "Tucker2Conv2d",
        "LowRankLinear",
        "LowRankConv2d",
        "FactorizedLSTM",
    }
    lin = LayerGeometry.linear(8, 6)
    assert layers.layer_class("tt", lin) is layers.TTLinear
    assert layers.layer_class(get_format("svd"), lin) is layers.LowRankLinear

    class TTLinear(layers.TTLinear):  # another class of the same name
        pass

    with pytest.raises(ValueError, match="named 'TTLinear' is already registered"):
        layers.register_layer(TTLinear)

    class OtherTT(layers.TTLinear):  # a second module for ("tt", "linear")
        pass

    with pytest.raises(ValueError, match="format 'tt' already builds TTLinear for linear"):
        layers.register_layer(OtherTT)
    assert "OtherTT" not in registry.layer_classes()
    layers.register_layer(layers.TTLinear)  # registering the same class again is a no-op


#: inside a package split into modules: which of its siblings each module may import (the
#: package's ``__init__``, which puts them together, imports them all and none imports it)
SIBLINGS = {
    "planning": {"records": (), "selection": (), "ranks": ("records",)},
    "pipeline": {"runfolder": (), "phase": ()},
}


@pytest.mark.parametrize("package", sorted(SIBLINGS))
def test_the_modules_of_a_split_package_import_one_way(package) -> None:
    pkg = f"tdcompress.{package}"
    rules = SIBLINGS[package]
    assert {p.stem for p in (SRC / package).glob("*.py")} == {"__init__", *rules}
    bad = []
    for name, allowed in rules.items():
        ok = {f"{pkg}.{a}" for a in allowed}
        for line, mod in _imported(SRC / package / f"{name}.py"):
            if mod == pkg or (
                mod.startswith(pkg + ".")
                and not any(mod == a or mod.startswith(a + ".") for a in ok)
            ):
                bad.append(f"{package}/{name}.py:{line} imports {mod}")
    assert not bad, "\n".join(bad)
