"""A ``nanospec serve`` child process on 127.0.0.1 for the tools and the tests: start it, wait for ``/health``,
read ``/metrics``, measure its resident memory, stop it. Used by ``nanospec bench soak`` and
``tests/e2e/conftest.py`` (the shared test server).

Imports nothing heavy (``requests`` only when a method talks HTTP); vLLM runs in the child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .engine import preload_iomp

__all__ = ["ServeProcess", "free_port", "metric", "serve_env", "tree_rss_mb", "tree_rss_parts"]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets) in a Prometheus text page; KeyError when absent."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(name)
    return total


def serve_env(kv_cache_gib: float = 1, iomp: bool = True, **extra: str) -> dict[str, str]:
    """The child's environment: this one plus loopback only, no hub, no usage reports, the CPU KV-cache size
    (GiB), unbuffered output, statistics every 2 s, and (``iomp``) Intel OpenMP preloaded (see
    :func:`nanospec_vllm.tools.engine.preload_iomp`). ``extra`` overrides."""
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE=f"{kv_cache_gib:g}", VLLM_LOG_STATS_INTERVAL="2",
               PYTHONUNBUFFERED="1")
    if iomp:
        preload_iomp(env)
    env.update(extra)
    return env


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_rss_mb(pid: int) -> float:
    """Resident memory (VmRSS, MiB) of ``pid`` and all its descendants, summed (pages shared between them count
    once per process, so use differences, not the absolute value). Reads ``/proc`` (Linux); 0 when gone."""
    return sum(tree_rss_parts(pid).values())


def tree_rss_parts(pid: int) -> dict[str, float]:
    """:func:`tree_rss_mb` per process: ``{"<name> <pid>": MiB}`` (name from ``/proc/<pid>/comm``; a server's API
    process and its engine core apart, to tell which one grows)."""
    kids, todo, out = _children(), [pid], {}
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            with open(f"/proc/{p}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[f"{name} {p}"] = int(line.split()[1]) / 1024
                        break
        except OSError:
            continue
    return out


class ServeProcess:
    """``python -m nanospec_vllm.cli serve MODEL --host 127.0.0.1 --port P ARGS...`` in its own process group.

    The constructor returns once ``/health`` answers 200 (polled every second) and raises RuntimeError with the
    log's tail when the child exits or ``timeout`` seconds pass. Output goes to ``log``. Costs one vLLM server
    (the model's weights, its KV cache) until :meth:`stop`.
    """

    def __init__(self, model: str | os.PathLike[str], args: list[str], log: Path, env: dict[str, str] | None = None,
                 timeout: float = 300) -> None:
        import requests

        self.model = str(model)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        cmd = [sys.executable, "-m", "nanospec_vllm.cli", "serve", self.model, "--port", str(self.port),
               "--host", "127.0.0.1", *args]
        self.cmd = cmd
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or serve_env(),
                                         cwd=ROOT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited rc={self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout:g} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the server log."""
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (vLLM shuts its engine down), then SIGKILL to the process group after ``timeout`` s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group is this child's own (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout)

    def metrics(self) -> str:
        import requests

        return requests.get(self.base + "/metrics", timeout=30).text

    def metric(self, name: str) -> float:
        return metric(self.metrics(), name)

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(self.base + "/health", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def rss_mb(self) -> float:
        """:func:`tree_rss_mb` of the server (API process + engine core)."""
        return tree_rss_mb(self.proc.pid)

    def rss_parts(self) -> dict[str, float]:
        """:func:`tree_rss_parts` of the server."""
        return tree_rss_parts(self.proc.pid)

    def wait_metric(self, name: str, value: float, timeout: float = 30) -> float:
        """Poll ``name`` until it equals ``value`` or ``timeout`` s pass; return the last value read."""
        deadline = time.time() + timeout
        v = -1.0
        while True:
            v = self.metric(name)
            if v == value or time.time() >= deadline:
                return v
            time.sleep(0.5)
