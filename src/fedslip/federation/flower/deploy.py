"""A real Flower deployment on loopback: one `flower-superlink` and N `flower-supernode` processes.

Everything is what one would run across machines, only every address is 127.0.0.1:

* TLS: a CA and a SuperLink certificate (SAN 127.0.0.1, localhost) are generated for the run with
  `cryptography`; SuperNodes and the `flwr` CLI verify the SuperLink against that CA.
* Node authentication: each SuperNode gets its own EC key pair; its public key is registered with
  `flwr supernode register` before it starts (`--enable-supernode-auth` on the SuperLink), so an
  unregistered SuperNode is refused.
* Each SuperNode has its own node config: `partition-id`, `num-partitions` and its own `state-dir`, where
  the ClientApp keeps its private state, its wire log and its events.
* The app is submitted with `flwr run <project> <connection> --run-config <file>`, from an isolated
  FLWR_HOME; the ServerApp writes the same output files as `fedslip run` into `out`.
* `insecure=True` runs the same thing without TLS and without node authentication, for local debugging.
* Every command started (`flower-superlink`, `flwr supernode register`, `flower-supernode`, `flwr run`) is
  appended to `<workdir>/commands.sh`: the steps to repeat by hand on separate machines.

Every process started here (and every process they start: SuperExec, ServerApp, ClientApps) is stopped by
process id when the deployment closes.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedslip.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[4]  # the folder with pyproject.toml ([tool.flwr.app])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- certificates and keys -------------------------------------------------------------------------------
def make_tls(folder: Path) -> dict[str, Path]:
    """A CA and a SuperLink certificate for 127.0.0.1/localhost, valid for a day."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedslip loopback CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format (what SuperNode authentication reads)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


# --- processes -------------------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process for good."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields:
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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

    def refresh(self) -> None:
        if self.popen.poll() is None:
            for pid in descendants(self.popen.pid):
                self.tree.setdefault(pid, start_time(pid))

    def pids(self) -> dict[int, int | None]:
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
                 simulation: bool = False, project: Path = PROJECT_ROOT):
        self.workdir = Path(workdir).resolve()
        self.n_nodes = n_nodes
        self.insecure = insecure
        self.node_auth = (not insecure) if node_auth is None else node_auth
        if self.node_auth and insecure:
            raise UserError("SuperNode authentication needs TLS: drop --insecure or --node-auth")
        self.simulation = simulation
        self.project = Path(project)
        if not (self.project / "pyproject.toml").is_file():
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
        res = subprocess.run([exe, *args], capture_output=True, text=True, env=self.env(), cwd=self.workdir,
                             timeout=timeout)
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
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def refresh(self) -> None:
        """Remember every pid started under our processes (call while a run is going)."""
        for proc in self.procs.values():
            proc.refresh()

    # --- runs -------------------------------------------------------------------------------------
    def submit(self, run_config: dict[str, Any], federation_config: dict[str, Any] | None = None) -> int:
        path = self.workdir / f"run-config-{len(list(self.workdir.glob('run-config-*.toml')))}.toml"
        path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in run_config.items()), encoding="utf-8")
        args = ["run", str(self.project), "loopback", "--run-config", str(path), "--format", "json"]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items())]
        out = self._flwr(*args)
        doc = json.loads(out[out.index("{"):])
        if not doc.get("success"):
            raise RuntimeError(f"flwr run failed: {out}")
        return int(doc["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        out = self._flwr("list", "loopback", "--run-id", str(run_id), "--format", "json")
        doc = json.loads(out[out.index("{"):])
        return doc["runs"][0]

    def wait(self, run_id: int, timeout: float = 1800.0, poll: float = 3.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            info = self.status(run_id)
            if str(info["status"]).startswith("finished"):  # finished:completed | finished:failed | ...
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {info['status']} after {timeout:.0f} s")
            time.sleep(poll)

    def logs(self, run_id: int) -> str:
        try:
            return self._flwr("log", str(run_id), "loopback", "--show", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return str(e)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML escapes)


def run_config_for(preset: str | None, method: str, config_file: str | None, sets: list[str], out: Path,
                   min_available: int = 0, round_timeout: float = 600.0) -> dict[str, Any]:
    return {"preset": preset or "", "method": method, "config-file": str(Path(config_file).resolve()) if config_file
            else "", "overrides": "; ".join(sets), "out": str(Path(out).resolve()), "min-available": min_available,
            "round-timeout": round_timeout}


def collect_node_logs(lb: Loopback, out: Path) -> None:
    """Copy each node's wire log and events next to the ServerApp's outputs (out/nodes/node<k>/)."""
    for k in range(lb.n_nodes):
        for name in ("wire.jsonl", "events.jsonl"):
            src = lb.state_dir(k) / name
            if src.is_file():
                dst = out / "nodes" / f"node{k}" / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)


def deploy(run_config: dict[str, Any], workdir: Path, n_nodes: int = 4, insecure: bool = False,
           timeout: float = 1800.0) -> dict[str, Any]:
    """Start everything, run the app once, collect, stop everything. Returns the run's final status."""
    with Loopback(workdir, n_nodes, insecure=insecure) as lb:
        run_id = lb.submit(run_config)
        info = lb.wait(run_id, timeout)
        (Path(workdir) / "run.log").write_text(lb.logs(run_id), encoding="utf-8")
        out = Path(run_config["out"])
        if info["status"] != "finished:completed" or not (out / "results.json").is_file():
            raise RuntimeError(f"run {run_id} ended as {info['status']}; see {workdir}/run.log")
        collect_node_logs(lb, out)
        return info


def load_pyproject_run_defaults(project: Path = PROJECT_ROOT) -> dict[str, Any]:
    table = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(table["tool"]["flwr"]["app"]["config"])
