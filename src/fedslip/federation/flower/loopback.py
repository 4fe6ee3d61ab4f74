"""A Flower deployment on loopback: one `flower-superlink` and N `flower-supernode` processes.

Everything is what one would run across machines, only every address is 127.0.0.1:

* TLS: a CA and a SuperLink certificate (tls.make_tls); SuperNodes and the `flwr` CLI verify the SuperLink
  against that CA.
* Node authentication: each SuperNode gets its own EC key pair (tls.make_node_keys); its public key is
  registered with `flwr supernode register` before it starts (`--enable-supernode-auth` on the SuperLink), so
  an unregistered SuperNode is refused.
* Each SuperNode has its own node config: `partition-id`, `num-partitions` and its own `state-dir`, where
  the ClientApp keeps its private state, its wire log and its events.
* The app is submitted with `flwr run <app> <connection> --run-config <file>`, from an isolated FLWR_HOME.
  `<app>` is a Flower app folder written into the workdir (`write_app_dir`: a pyproject.toml naming the
  ServerApp and ClientApp of the installed `fedslip` package), so no source checkout is needed. No process
  installs dependencies at run time (`--disable-runtime-dependency-installation` on the SuperLink; SuperNodes
  do not by default): the app runs from the environment that runs these processes.
* `insecure=True` runs the same thing without TLS and without node authentication, for local debugging.
* Every command started (`flower-superlink`, `flwr supernode register`, `flower-supernode`, `flwr run`) is
  appended to `<workdir>/commands.sh`: the steps to repeat by hand on separate machines.

Every process started here (and every process they start: SuperExec, ServerApp, ClientApps) is stopped by
process id (and start time) when the deployment closes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fedslip
from fedslip.errors import UserError
from fedslip.federation.flower.runtime import RUN_DEFAULTS
from fedslip.federation.flower.tls import make_node_keys, make_tls

# --- the Flower app ---------------------------------------------------------------------------------------
# What `flwr run` submits: the components and default run config of [tool.flwr.app] in the repository's
# pyproject.toml (keep them the same; tests/test_flower_app_dir.py compares them).
APP_COMPONENTS = {"serverapp": "fedslip.federation.flower.app:server_app",
                  "clientapp": "fedslip.federation.flower.app:client_app"}
APP_CONFIG: dict[str, Any] = {**RUN_DEFAULTS, "preset": "quick"}
APP_DIR_NAME = "fedslip-app"  # letters and hyphens: a valid Flower app name, and not an importable package


def write_app_dir(folder: Path) -> Path:
    """Write a Flower app folder: only a pyproject.toml with [project] and [tool.flwr.app]. Returns folder.

    `flwr run <folder>` bundles it into a FAB (the pyproject.toml is all a FAB needs); the SuperLink and the
    SuperNodes install that FAB and import the components from their own environment, where `fedslip` is
    installed. The folder holds nothing else, so nothing else goes into the FAB."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["[project]", 'name = "fedslip"', f"version = {_toml(fedslip.__version__)}",
             'description = "FedSLIP as a Flower app (components from the installed fedslip package)"',
             'license = { text = "Apache-2.0" }', "", "[tool.flwr.app]", 'publisher = "fedslip"', "",
             "[tool.flwr.app.components]", *(f"{k} = {_toml(v)}" for k, v in APP_COMPONENTS.items()), "",
             "[tool.flwr.app.config]", *(f"{k} = {_toml(v)}" for k, v in APP_CONFIG.items())]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML escapes)


# --- processes -------------------------------------------------------------------------------------------
SERVERAPP_EXES = {"flwr-serverapp", "flwr-simulation"}  # what the SuperLink starts per run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process for good."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def process_table() -> dict[int, tuple[int, int]]:
    """Every process now: pid -> (parent pid, start time), from one pass over /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields:
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """Every process below `pid`: pid -> start time (`table`: a `process_table()` already taken)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child][1]
            todo.append(child)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def _alive(pid: int, started: int | None) -> bool:
    """Still running, and still the process we started (unknown start time: not ours to signal)."""
    fields = _stat(pid)
    return started is not None and bool(fields) and fields[0] != "Z" and int(fields[19]) == started


def stop_pids(pids: dict[int, int | None], grace: float = 10.0, first: int = signal.SIGTERM) -> None:
    """Signal `first` to each (pid, start time) still alive, wait up to `grace` s, SIGKILL what is left.

    Only these processes: a pid whose start time differs is another process that reused the number."""
    def send(sig: int) -> None:
        for pid, started in pids.items():
            if _alive(pid, started):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    send(first)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in pids.items()):
        time.sleep(0.2)
    send(signal.SIGKILL)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    started: int | None = None  # start time of the process itself
    tree: dict[int, int | None] = field(default_factory=dict)  # pid -> start time of everything seen under it

    def refresh(self, table: dict[int, tuple[int, int]] | None = None) -> None:
        if self.popen.poll() is None:
            for pid, started in descendants(self.popen.pid, table).items():
                self.tree.setdefault(pid, started)

    def pids(self, refresh: bool = True) -> dict[int, int | None]:
        if refresh:
            self.refresh()
        return {self.popen.pid: self.started, **self.tree}

    def stop(self, grace: float = 10.0, first: int = signal.SIGTERM) -> None:
        stop_pids(self.pids(), grace, first)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def alive(pids: dict[int, int | None]) -> list[int]:
    return [p for p, s in pids.items() if _alive(p, s)]


class Loopback:
    """SuperLink + N SuperNodes on 127.0.0.1. Use as a context manager: everything stops on exit."""

    def __init__(self, workdir: Path, n_nodes: int = 4, insecure: bool = False, node_auth: bool | None = None,
                 simulation: bool = False, project: Path | None = None):
        """project: a Flower app folder to submit; None: the fedslip app, written to <workdir>/fedslip-app."""
        self.workdir = Path(workdir).resolve()
        self.n_nodes = n_nodes
        self.insecure = insecure
        self.node_auth = (not insecure) if node_auth is None else node_auth
        if self.node_auth and insecure:
            raise UserError("SuperNode authentication needs TLS: drop --insecure or --node-auth")
        self.simulation = simulation
        self.write_app = project is None
        self.project = self.workdir / APP_DIR_NAME if project is None else Path(project).resolve()
        if not self.write_app and not (self.project / "pyproject.toml").is_file():
            raise UserError(f"no pyproject.toml (the Flower app) in {self.project}")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.home = self.workdir / "flwr-home"
        self.procs: dict[str, Proc] = {}
        self.tls: dict[str, Path] = {}
        self.node_ports: dict[int, int] = {}
        self.node_keys: dict[int, tuple[Path, Path]] = {}
        self.killed: dict[int, int | None] = {}
        self.stopped_pids: dict[int, int | None] = {}

    # --- environment ------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # flower-superexec, flwr-clientapp, ...
        env["FLWR_HOME"] = str(self.home)
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # every node shares this machine's cores: without a cap, N ClientApps x all-core torch thread pools
        # oversubscribe the CPU many times over (on 2 cores, a run gets several times slower)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, self.n_nodes))))
        return env

    def _note(self, args: list[str]) -> None:
        """Append the command to <workdir>/commands.sh: the exact steps to repeat by hand across machines."""
        import shlex

        with open(self.workdir / "commands.sh", "a", encoding="utf-8") as f:
            f.write(shlex.join([Path(args[0]).name, *args[1:]]) + "\n")

    def _spawn(self, name: str, args: list[str]) -> Proc:
        self._note(args)
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            popen = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir,
                                     start_new_session=True)
        proc = Proc(name, popen, log, started=start_time(popen.pid))
        self.procs[name] = proc
        return proc

    def _flwr(self, *args: str, timeout: float = 120.0) -> str:
        exe = str(Path(sys.executable).parent / "flwr")
        if args[0] in ("run", "supernode"):
            self._note([exe, *args])
        try:
            res = subprocess.run([exe, *args], capture_output=True, text=True, env=self.env(), cwd=self.workdir,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"flwr {args[0]} did not answer within {timeout:.0f} s") from None
        if res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
        return res.stdout

    def _wait_port(self, port: int, proc: Proc, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log}:\n"
                                   f"{proc.log.read_text(errors='replace')[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout:.0f} s; see {proc.log}")

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "Loopback":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        if self.write_app:
            write_app_dir(self.project)
        exe = Path(sys.executable).parent
        args = [str(exe / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.workdir / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.insecure:
            args.append("--insecure")
        else:
            self.tls = make_tls(self.workdir / "certs")
            args += ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
                     "--ssl-keyfile", str(self.tls["key"])]
        if self.node_auth:
            args.append("--enable-supernode-auth")
        if self.simulation:
            args.append("--simulation")
        proc = self._spawn("superlink", args)
        self._write_flwr_config()
        self._wait_port(self.port, proc, timeout)
        time.sleep(1.0)
        for k in range(0 if self.simulation else self.n_nodes):
            self.start_node(k, timeout=timeout)
        return self

    def _write_flwr_config(self) -> None:
        lines = ['[superlink]', 'default = "loopback"', '', '[superlink.loopback]', f'address = "{self.address}"']
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls["ca"]}"')
        (self.home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def state_dir(self, k: int) -> Path:
        return self.workdir / f"node{k}"

    def start_node(self, k: int, timeout: float = 180.0) -> Proc:
        """Start (or restart) the SuperNode of partition k, with its own node config and state folder."""
        exe = Path(sys.executable).parent
        port = self.node_ports.setdefault(k, free_port())
        node_config = f'partition-id={k} num-partitions={self.n_nodes} state-dir="{self.state_dir(k)}"'
        args = [str(exe / "flower-supernode"), "--superlink", self.address, "--port", str(port),
                "--node-config", node_config]
        if self.insecure:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.tls["ca"])]
        if self.node_auth:
            if k not in self.node_keys:
                self.node_keys[k] = make_node_keys(self.workdir / "keys", f"node{k}")
                self._flwr("supernode", "register", str(self.node_keys[k][1]), "loopback", "--name", f"node{k}")
            args += ["--auth-supernode-private-key", str(self.node_keys[k][0])]
        proc = self._spawn(f"node{k}", args)
        self._wait_port(port, proc, timeout)
        return proc

    def stop_node(self, k: int) -> None:
        proc = self.procs.pop(f"node{k}", None)
        if proc is not None:
            proc.stop()

    def kill_node(self, k: int) -> dict[int, int | None]:
        """SIGKILL SuperNode k and everything it started (a crash: no goodbye to the SuperLink)."""
        proc = self.procs.pop(f"node{k}")
        pids = proc.pids()
        proc.stop(grace=5.0, first=signal.SIGKILL)
        self.killed.update(pids)
        return pids

    def all_pids(self) -> dict[int, int | None]:
        """Every process started under this deployment so far (killed ones included): pid -> start time."""
        out = dict(self.killed)
        for proc in self.procs.values():
            out.update(proc.pids())
        return out

    def stop(self) -> None:
        self.stopped_pids = self.all_pids()
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()

    def __enter__(self) -> "Loopback":
        try:
            return self.start()
        except BaseException:  # __exit__ will not run: stop what started before the failure
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def refresh(self, table: dict[int, tuple[int, int]] | None = None) -> None:
        """Remember every pid started under our processes (call while a run is going): one pass over /proc."""
        table = process_table() if table is None else table
        for proc in self.procs.values():
            proc.refresh(table)

    # --- runs -------------------------------------------------------------------------------------
    def submit(self, run_config: dict[str, Any], federation_config: dict[str, Any] | None = None) -> int:
        path = self.workdir / f"run-config-{len(list(self.workdir.glob('run-config-*.toml')))}.toml"
        path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in run_config.items()), encoding="utf-8")
        args = ["run", str(self.project), "loopback", "--run-config", str(path), "--format", "json"]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items())]
        out = self._flwr(*args)
        doc = _json_in(out, "flwr run")
        if not doc.get("success"):
            raise RuntimeError(f"flwr run failed: {out}")
        return int(doc["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        out = self._flwr("list", "loopback", "--run-id", str(run_id), "--format", "json")
        doc = _json_in(out, "flwr list")
        if not doc.get("runs"):
            raise RuntimeError(f"flwr list: no run {run_id} on the SuperLink: {out[-500:]}")
        return doc["runs"][0]

    def serverapps(self, table: dict[int, tuple[int, int]] | None = None) -> set[int]:
        """The ServerApp (or simulation) processes running under the SuperLink now (`table`: a
        `process_table()` already taken)."""
        proc = self.procs.get("superlink")
        if proc is None:
            return set()
        proc.refresh(process_table() if table is None else table)
        return {pid for pid, started in proc.pids(refresh=False).items()
                if _alive(pid, started) and any(Path(a).name in SERVERAPP_EXES for a in _cmdline(pid)[:2])}

    def wait(self, run_id: int, timeout: float = 1800.0, poll: float = 0.5, ask_every: float = 30.0
             ) -> dict[str, Any]:
        """Until the run has finished. Asking the SuperLink (`flwr list`) costs a Python process (~1.5 CPU-s,
        a third of a core at one call per 3 s), so ask every `ask_every` s, and every 3 s once a ServerApp
        process has ended; in between, look at /proc every `poll` s."""
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        finishing, next_ask = False, time.monotonic()
        while True:
            table = process_table()
            self.refresh(table)
            running = self.serverapps(table)
            now = time.monotonic()
            if seen - running and not finishing:
                finishing, next_ask = True, now
            seen |= running
            if now >= next_ask:
                info = self.status(run_id)
                if str(info["status"]).startswith("finished"):  # finished:completed | finished:failed | ...
                    return info
                if now > deadline:
                    raise TimeoutError(f"run {run_id} still {info['status']} after {timeout:.0f} s")
                next_ask = time.monotonic() + (3.0 if finishing else ask_every)
            time.sleep(poll)

    def logs(self, run_id: int) -> str:
        try:
            return self._flwr("log", str(run_id), "loopback", "--show", timeout=60)
        except RuntimeError as e:
            return str(e)


def _json_in(out: str, what: str) -> dict:
    """The JSON object a `flwr ... --format json` call printed (after any other lines)."""
    try:
        return json.loads(out[out.index("{"):])
    except ValueError:
        raise RuntimeError(f"{what} printed no JSON: {out[-500:]}") from None
