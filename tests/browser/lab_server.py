"""A private JupyterLab server for the browser tests: localhost, a free port, a random token, its own
config/settings/workspace folders, no network calls of its own, and a clean stop (kernels included)."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Generous: a 2-core CI box may be busy when the server starts.
SERVER_START_TIMEOUT_S = float(os.environ.get("LONGCAT_NB_BROWSER_SERVER_TIMEOUT", 180))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_settings(settings_dir: Path) -> None:
    """User settings for a quiet, deterministic JupyterLab: no news or update checks (no network),
    no toasts over the notebook, and every cell attached to the DOM (the default windowing detaches
    or skips off-screen cells, which the test inspects)."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for rel, content in files.items():
        f = settings_dir / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(content))


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    log: Path
    process: subprocess.Popen

    def api(self, method: str, path: str, timeout: float = 30):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    def shutdown_kernels(self) -> None:
        """One kernel per notebook, ended when the test moves to the next one (tiny model, but
        five torch kernels at once crowd a 2-core CI box)."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")


def start_lab(root: Path, state_dir: Path, log_path: Path) -> LabServer:
    """`python -m jupyterlab` from this interpreter on a free localhost port, with a random token,
    private config/settings/workspace folders and no network calls of its own."""
    token = secrets.token_hex(24)
    port = free_port()
    settings = state_dir / "lab-settings"
    _lab_settings(settings)
    env = dict(os.environ)
    # The kernel inherits this environment: a live notebook (widgets, h264 videos), not the headless
    # mode `python -m longcat_nb demo` sets for papermill.
    for key in ("LONGCAT_NB_HEADLESS", "MPLBACKEND"):
        env.pop(key, None)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        JUPYTER_CONFIG_DIR=str(state_dir / "jupyter-config"),  # ignore the user's server config
        JUPYTER_RUNTIME_DIR=str(state_dir / "jupyter-runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(state_dir / "lab-workspaces"),
        IPYTHONDIR=str(state_dir / "ipython"),  # no user startup files in the kernel
    )
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ServerApp.terminals_enabled=False",
           "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--ServerApp.allow_root=True")
    log = open(log_path, "wb")
    # Own process group: teardown can end the server and the kernels it started, and nothing else.
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    server = LabServer(f"http://127.0.0.1:{port}", token, root, log_path, proc)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last_error = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode} while starting "
                               f"({' '.join(cmd)}); its log:\n{server.log_tail()}")
        try:
            server.api("GET", "/api/status", timeout=5)
            return server
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last_error = e
            time.sleep(0.5)
    stop_lab(server)
    raise RuntimeError(f"JupyterLab did not answer on {server.url}/api/status within "
                       f"{SERVER_START_TIMEOUT_S:.0f}s (last error: {last_error}); its log:\n{server.log_tail()}")


def stop_lab(server: LabServer) -> None:
    if server.process.poll() is None:
        try:
            server.api("POST", "/api/shutdown", timeout=10)  # also shuts its kernels down
            server.process.wait(timeout=30)
        except Exception:
            pass
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=15)
    # Kernels are in the server's process group; end any left behind.
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone: nothing was left behind
        pass
