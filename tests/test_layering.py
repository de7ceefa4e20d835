"""The layering rules of DESIGN.md and STYLE.md habit 7, enforced."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import posttrain

PACKAGE = Path(posttrain.__file__).parent
ALLOWED_IN_ALGOS = {"torch", "posttrain"} | set(sys.stdlib_module_names)
ALLOWED_POSTTRAIN_IN_ALGOS = ("posttrain.algos", "posttrain.errors", "posttrain.registry")


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_algos_imports_only_torch_stdlib_and_errors():
    offenders = []
    for path in sorted((PACKAGE / "algos").rglob("*.py")):
        for name in imports_of(path):
            root = name.split(".")[0]
            if root not in ALLOWED_IN_ALGOS:
                offenders.append(f"{path.name}: {name}")
            elif root == "posttrain" and not name.startswith(ALLOWED_POSTTRAIN_IN_ALGOS):
                offenders.append(f"{path.name}: {name} (only algos, errors and registry)")
    assert not offenders, "posttrain.algos must import only torch and the standard library:\n" + \
        "\n".join(offenders)


def test_the_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy as np\nfrom transformers import AutoModel\nimport math\n")
    assert imports_of(bad) == ["numpy", "transformers", "math"]


def test_import_posttrain_is_light():
    heavy = ["transformers", "datasets", "peft", "accelerate", "tensorboard", "matplotlib",
             "pyarrow", "torch"]
    code = (
        "import sys, posttrain, posttrain.cli;"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_algos_does_not_pull_heavy_packages():
    code = (
        "import sys, posttrain.algos;"
        "print([m for m in ('transformers', 'datasets', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
