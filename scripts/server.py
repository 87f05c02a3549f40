"""Starting the real app in a subprocess on a free loopback port: for the tests and the load script."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class AppDidNotStart(RuntimeError):
    pass


def start_app(model_path: Path, *options: str, env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
    """Start `python app.py --model model_path [options]` on a free loopback port (with `env` added to the
    environment); returns its URL and process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        **(env or {}),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--model", str(model_path), *options],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AppDidNotStart(f"app exited: {process.stdout.read()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return f"http://127.0.0.1:{port}/", process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AppDidNotStart("app did not start within 120 s")


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)
