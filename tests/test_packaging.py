"""What a non-editable install ships: every file the repository keeps beside a package's modules
(CUDA C sources, the demo's data and its licence notice, the GPU run scripts) is named by
pyproject.toml's package-data, so that a wheel carries it."""

import fnmatch
import pathlib
import subprocess

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_file_beside_a_package_ships_in_the_wheel():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = conf.get("package-dir", {})
    data = conf.get("package-data", {})
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()[:200]}")
    files = set(tracked.stdout.split())
    missing = []
    for pkg in conf["packages"]:
        folder = _folder(pkg, dirs)  # its own package-dir entry, else its parent's folder plus its last name
        beside = [f for f in files if f.rpartition("/")[0] == folder and not f.endswith(".py")]
        assert any(f.startswith(folder + "/") for f in files), f"package {pkg}: no folder {folder}"
        for f in beside:
            name = f.rpartition("/")[2]
            if not any(fnmatch.fnmatch(name, pat) for pat in data.get(pkg, ())):
                missing.append(f)
    assert not missing, f"tracked files a wheel leaves out (add them to [tool.setuptools.package-data]): {sorted(missing)}"
    # and every package folder (an __init__.py) under the shipped trees is a listed package (gpu_nn.nn.utils
    # became one at stop 58: a wheel without it could not import gpu_nn.nn)
    listed = {_folder(pkg, dirs) for pkg in conf["packages"]}
    roots = {"gpu_nn", *dirs.values()}
    unlisted = sorted(f.rpartition("/")[0] for f in files if f.endswith("/__init__.py")
                      and f.split("/")[0] in roots and f.rpartition("/")[0] not in listed)
    assert not unlisted, f"package folders missing from [tool.setuptools] packages: {unlisted}"


def _folder(pkg: str, dirs: dict) -> str:
    parts = pkg.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in dirs:
            return "/".join([dirs[".".join(parts[:i])], *parts[i:]])
    return "/".join(parts)
