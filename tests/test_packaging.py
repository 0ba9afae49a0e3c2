"""Packaging: one import root (``keye_vl``), nothing installed under a generic top-level name, every package folder
listed in setup.cfg, and the public imports of the README work."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_public_imports():
    from keye_vl import KeyeVL2Config, KeyeVL2MoeForConditionalGeneration  # noqa: F401
    from keye_vl.modeling_keye import tiny_config  # noqa: F401


def test_setup_cfg_maps_every_folder_under_keye_vl():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    packages = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    assert all(p == "keye_vl" or p.startswith("keye_vl.") for p in packages)
    mapping = dict(
        line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines() if "=" in line
    )
    mapping = {k.strip(): v.strip() for k, v in mapping.items()}
    for pkg, folder in mapping.items():
        assert pkg in packages
        assert (REPO / folder / "__init__.py").is_file(), folder
    # every sub-folder with Python code under a mapped folder is itself listed
    for pkg, folder in mapping.items():
        for sub in (REPO / folder).iterdir():
            if sub.is_dir() and (sub / "__init__.py").exists():
                assert f"{pkg}.{sub.name}" in packages, sub


def test_generic_names_are_not_importable_from_outside_the_repo(tmp_path):
    code = (
        "import importlib.util, sys\n"
        "import keye_vl.kernels, keye_vl.processing, keye_vl.modeling_keye\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or 'keye' not in str(spec.origin), spec.origin\n"
        "assert importlib.util.find_spec('processing') is None\n"
        "assert importlib.util.find_spec('modeling_keye') is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_flat_kernel_file_is_linked_beside_the_modeling_files():
    """The Hub export copies only sibling files: each kernels/keye_dsa_*.py needs its link in modeling_keye/."""
    names = sorted(p.name for p in (REPO / "kernels").glob("keye_dsa_*.py"))
    assert "keye_dsa_reference.py" in names and "keye_dsa_triton.py" in names
    for name in names:
        link = REPO / "modeling_keye" / name
        assert link.is_symlink() and link.resolve() == (REPO / "kernels" / name).resolve(), name


def test_a_checkout_imports_without_installation(tmp_path):
    """No pip install (a GPU machine without a package index): the repo root on sys.path is enough, also for the
    subpackages that live beside keye_vl/ (python -S: no .pth file, so no editable-install finder)."""
    import site

    paths = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    paths += [line.strip() for p in paths for f in Path(p).glob("zz_*.pth") for line in f.read_text().splitlines()]
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}]\n"
        f"sys.path += {paths!r}\n"
        "import keye_vl.kernels.keye_dsa_reference as r, keye_vl.training.rewards\n"
        f"assert r.__file__.startswith({str(REPO / 'kernels')!r}), r.__file__\n"
        "assert 'kernels' not in sys.modules and 'processing' not in sys.modules, 'a generic top-level name was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
