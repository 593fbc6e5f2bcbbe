"""Browser tests: a real JupyterLab on localhost, driven by headless Chromium through playwright.

Nothing here downloads a browser: playwright drives the system's chromium (Debian: `apt-get install
chromium`). `bash scripts/browser_test.sh` installs everything on a fresh machine and runs these tests.
Without chromium, jupyterlab or playwright the tests are skipped, with the missing piece named.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run `bash scripts/browser_test.sh` (installs chromium, jupyterlab and playwright)"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: end-to-end test in JupyterLab + headless Chromium "
                   "(needs chromium, jupyterlab, playwright; scripts/browser_test.sh)")


def chromium_executable() -> str | None:
    """LONGCAT_NB_CHROMIUM, else the first chromium on PATH (Debian's wrapper is /usr/bin/chromium)."""
    explicit = os.environ.get("LONGCAT_NB_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_requirements() -> list[str]:
    missing = []
    if chromium_executable() is None:
        where = os.environ.get("LONGCAT_NB_CHROMIUM")
        missing.append(f"no chromium at LONGCAT_NB_CHROMIUM={where}" if where else
                       "no `chromium` on PATH (apt-get install chromium)")
    for module, package in (("jupyterlab", "jupyterlab"), ("playwright", "playwright"),
                            ("jupyterlab_widgets", "jupyterlab_widgets (ipywidgets' JupyterLab renderer)")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"python package {package} is not installed (pip install -e .[dev,browser])")
    return missing


@pytest.fixture(scope="session")
def browser_requirements() -> str:
    missing = missing_requirements()
    if missing:
        message = "browser test needs: " + "; ".join(missing) + f" -- {INSTALL_HINT}"
        if os.environ.get("LONGCAT_NB_BROWSER_REQUIRED") == "1":  # scripts/browser_test.sh: never pass by skipping
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return chromium_executable()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Screenshots, logs and timings; gitignored. Old screenshots and logs are removed first so a
    folder never mixes two runs."""
    path = Path(os.environ.get("LONGCAT_NB_BROWSER_ARTIFACTS", REPO / "browser-artifacts")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.png"), *path.glob("*.log"), path / "timings.json"]:
        old.unlink(missing_ok=True)
    return path
