"""kernels/ and cli/ ship only inside the memkern namespace, in editable and wheel installs."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import importlib.util, memkern, memkern.kernels, memkern.cli.main;"
         "print(memkern.__file__); print(memkern.kernels.__file__);"
         "print(importlib.util.find_spec('kernels'), importlib.util.find_spec('cli'))")


def probe(cwd, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    return out[0], out[1], out[2]


def test_installed_layout_maps_kernels_and_cli(tmp_path):
    package, kernels, top_level = probe(tmp_path)
    assert Path(kernels).parent.name == "kernels" and Path(kernels).parent.parent != Path(package)
    assert top_level == "None None", "a top-level kernels or cli module is importable"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources: a build/ folder left in the checkout by an earlier build
    # can hold stale modules that setuptools reuses.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("memkern", "kernels", "cli"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    return next(out.glob("memkern-*.whl"))


def test_wheel_ships_every_subpackage_under_memkern_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"memkern", wheel.name.split("-py")[0] + ".dist-info"}, tops
    source_packages = {"memkern/" + str(p.parent.relative_to(REPO / "memkern")) + "/__init__.py"
                       for p in (REPO / "memkern").rglob("__init__.py")}
    source_packages = {p.replace("/./", "/") for p in source_packages}
    expected = source_packages | {"memkern/kernels/__init__.py", "memkern/cli/__init__.py",
                                  "memkern/kernels/channel_mask.py", "memkern/cli/main.py",
                                  "memkern/report/templates/report.html.j2"}
    assert expected <= set(names), expected - set(names)


def test_wheel_install_imports_from_the_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    package, kernels, top_level = probe(tmp_path, env=env)
    assert Path(package).is_relative_to(target) and Path(kernels).is_relative_to(target)
    assert Path(kernels) == target / "memkern" / "kernels" / "__init__.py"
    assert top_level == "None None"


def test_wheel_install_renders_the_report_template(wheel, tmp_path):
    """The page template is package data: an installed wheel finds it without the checkout."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    code = ("import jinja2; env = jinja2.Environment(loader=jinja2.PackageLoader('memkern.report', "
            "'templates')); print(env.get_template('report.html.j2').filename)")
    deps = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PYTHONPATH": ":".join([str(target)] + deps), "PATH": "/usr/bin:/bin"}
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).is_relative_to(target), found
