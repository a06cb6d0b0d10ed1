"""Build hook: bundle the viewer's noVNC, pinned in ``frontend/package-lock.json``, into the package.

noVNC's code is not kept in git: every wheel build (``pip install .``, ``pip install -e .``,
``pip wheel``) installs the locked version with ``npm ci`` and copies its ES modules (``core/``, its
vendored ``vendor/``) and licence files to ``src/desktop_gateway/web/static/novnc/`` (ignored by git,
listed as a wheel artifact), from where the gateway serves them. A build whose copy already matches
the lock file does not run npm again. Without npm the build fails with a sentence saying what to install.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE = "@novnc/novnc"
# What the viewer needs of the npm package: its modules and the licences they come under.
COPIED = ("core", "vendor", "LICENSE.txt", "AUTHORS", "package.json")
LICENCES = "docs/LICENSE*"
STAMP = ".bundled-from"  # the hash of the lock file the copy was made from
NO_NPM = (
    "Building desktop-gateway needs npm (Node.js 18 or later): the viewer's noVNC is installed from npm "
    "at build time. Install Node.js and npm (Debian: apt-get install npm), then build again."
)


def bundle_novnc(root: Path) -> Path:
    """Copy the locked noVNC into the package's static folder unless it is there already; return it."""
    frontend = root / "frontend"
    target = root / "src" / "desktop_gateway" / "web" / "static" / "novnc"
    lock = frontend / "package-lock.json"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    if (target / STAMP).is_file() and (target / STAMP).read_text().strip() == digest:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(NO_NPM)
    # --ignore-scripts: nothing of the package runs on the build machine; it is only copied.
    command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--silent"]
    done = subprocess.run(command, cwd=frontend, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"npm ci in {frontend} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    source = frontend / "node_modules" / PACKAGE
    pinned = json.loads(lock.read_text())["packages"][f"node_modules/{PACKAGE}"]["version"]
    installed = json.loads((source / "package.json").read_text())["version"]
    if installed != pinned:
        raise RuntimeError(f"npm installed {PACKAGE} {installed}, the lock file pins {pinned}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".novnc-", dir=target.parent))
    try:
        for name in COPIED:
            if (source / name).is_dir():
                shutil.copytree(source / name, staging / name)
            else:
                shutil.copy2(source / name, staging / name)
        for licence in source.glob(LICENCES):
            shutil.copy2(licence, staging / licence.name)
        (staging / STAMP).write_text(digest + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


class NoVNCBundle(BuildHookInterface[Any]):
    """Runs before the wheel (and the editable wheel) is built."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        bundle_novnc(Path(self.root))
