"""dcngen installed from a wheel, not run from the checkout: the wheel carries the templates, the
schedules and their tuning records, and an installed dcngen builds, verifies and caches kernels
in the user's folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGED = ("dcngen", "templates", "schedules")  # the source folders a wheel is made of


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if not line.endswith(".pyc")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tracked sources (the checkout itself stays untouched)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to tell the tracked sources")
    pytest.importorskip("setuptools", minversion="64")
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ["pyproject.toml", "README.md", *(f for folder in PACKAGED for f in _tracked(folder))]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, capture_output=True, text=True)
    (path,) = dist.glob("dcngen-*.whl")
    return path


def test_wheel_holds_every_source_template_schedule_and_record(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in PACKAGED:
        inside = "" if folder == "dcngen" else "dcngen/"
        missing = [f for f in _tracked(folder) if inside + f not in names]
        assert not missing, f"the wheel lacks {missing}"


def test_installed_wheel_builds_and_verifies_in_user_folders(wheel, tmp_path):
    site, home = tmp_path / "site", tmp_path / "home"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCNGEN_", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=str(site))
    script = textwrap.dedent(f"""
        import sys
        import dcngen, dcngen.settings as settings
        assert dcngen.__file__.startswith({str(site)!r}), dcngen.__file__
        assert settings.INSTALLED and settings.TEMPLATE_DIR.is_relative_to({str(site)!r})
        assert settings.cache_root() == settings.Path({str(home)!r}) / ".cache" / "dcngen"
        assert settings.records_dirs()[0] == settings.Path({str(home)!r}) / ".local" / "share" / "dcngen" / "records"
        from dcngen.cli import app
        sys.argv = ["dcngen", "verify", "--op", "dcnv3", "--group", "2", "--group-channels", "5", "--kernel-size", "3x2",
                    "--shape", "1x7x6", "--dtype", "float64"]
        app()
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    artifacts = list((home / ".cache" / "dcngen").glob("dcnv3_float64_cpu_template_*"))
    assert artifacts, "the kernel was not cached in the user's cache folder"
