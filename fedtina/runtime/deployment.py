"""Flower's deployment runtime on this machine: one SuperLink and N SuperNodes as real processes on loopback.

`Deployment` starts them (insecure, or with TLS certificates it generates; with TLS, SuperNode authentication too:
one EC key pair per SuperNode, generated here, each public key registered with the SuperLink through
`flwr supernode register`, so a SuperNode without a registered key is refused), writes the `flwr` CLI's connection
profile into its own FLWR_HOME, runs `flwr run <project> <profile> --stream` against them and follows the run to its end, and
stops every process it started on exit -- also when the run or the start fails (each daemon leads its own process
group, so the ServerApp and ClientApp processes they spawn go with them). The installed environment is used as it
is: the SuperLink runs with `--disable-runtime-dependency-installation` (no per-run `uv sync`), SuperNodes install
nothing by default. SuperNode i gets `--node-config "partition-id=i num-partitions=N"`: the ClientApp's partition.

Who a client is. With authentication the SuperLink gives each registered public key its node id at registration
(`flwr supernode register` answers it) and serves that node to whoever signs with the key's private half, and to no
one else (flwr 1.42: `Fleet.ActivateNode` looks the node up by the request's public key, and the auth interceptor
refuses any later request whose node id is not that key's). Key pair i is SuperNode i's, so the registrations give
the node -> partition map; it is written to `node_partitions.json` and handed to the ServerApp (`--run-config
node-partitions=...`), which takes each client's id from it, not from what the client says (fedtina.server.roster).
Without authentication the node ids are the SuperNodes' own choice and the ServerApp has no map.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedtina.errors import FedtinaError
from fedtina.io import write_private

PROFILE = "fedtina-local"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedtinaError(f"{what} exited with code {proc.returncode} while starting; see {log}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise FedtinaError(f"{what} did not open {host}:{port} within {timeout_s:g} s; see {log}")


def make_certificates(out: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A self-signed CA and a server certificate for `host` signed by it (PEM files in `out`), for the SuperLink's
    TLS; SuperNodes and the flwr CLI trust the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, sign_key, ca: bool, san=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(sign_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtina local CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    ca_cert = cert(ca_name, ca_name, ca_key, ca_key, ca=True)
    server_cert = cert(server_name, ca_name, server_key, ca_key, ca=False,
                       san=[x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")])
    paths = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(paths["key"], server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return paths


def make_node_keys(out: Path, n: int) -> list[tuple[Path, Path]]:
    """One EC P-384 key pair per SuperNode, in the OpenSSH formats `flower-supernode --auth-supernode-private-key`
    and `flwr supernode register` read: (private key, readable by the owner only; public key)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    pairs = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = out / f"supernode_{i}", out / f"supernode_{i}.pub"
        write_private(private, key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH))
        pairs.append((private, public))
    return pairs


def fresh_replay(prepared: str | Path, dest: str | Path):
    """A replay dir `dest` that starts from the prepared run dir's state: its own copy of the zoo (a run grows it)
    and of the prepared Tina checkpoint if any; the read-only inputs (features, images, partition) are shared. The
    prepared dir is left as it was, so every replay starts from the same zoo."""
    import shutil

    from fedtina.runtime.spec import RunSpec

    dest = Path(dest)
    if dest.exists():
        raise FedtinaError(f"replay dir {dest} exists already: replays start in a fresh dir")
    spec = RunSpec.load(prepared)
    dest.mkdir(parents=True)
    shutil.copytree(spec.zoo_dir, dest / "zoo")
    if Path(spec.tina_path).exists():
        (dest / "tina").mkdir()
        shutil.copy2(spec.tina_path, dest / "tina" / Path(spec.tina_path).name)
    spec.out_dir, spec.zoo_dir = str(dest.resolve()), str((dest / "zoo").resolve())
    spec.tina_path = str((dest / "tina" / Path(spec.tina_path).name).resolve())
    spec.save()
    return spec


def check_security(tls: bool, auth: bool, superlink: str | None) -> None:
    """The combinations Deployment can start: auth over TLS only (Flower's rule), and a joined SuperLink insecure
    and unauthenticated (its certificates and keys are not ours)."""
    if auth and not tls:
        raise FedtinaError("auth=true needs tls=true (Flower authenticates SuperNodes over TLS only); set "
                           "tls=true, or auth=false for an unauthenticated run")
    if superlink and (tls or auth):
        raise FedtinaError(f"superlink={superlink!r}: joining a running SuperLink is insecure and "
                           "unauthenticated here; set tls=false auth=false to join it")


def partition_map(answers: list[str]) -> dict[int, int]:
    """The node -> partition map from `flwr supernode register --format json`'s answers, `answers[i]` the one for
    SuperNode i's key ({"success": true, "node-id": N}); a missing, non-positive or repeated node id is one
    FedtinaError."""
    mapping: dict[int, int] = {}
    for i, text in enumerate(answers):
        try:
            doc = json.loads(text)
            node = doc.get("node-id") if doc.get("success") is True else None
        except (ValueError, AttributeError):
            node = None
        if not isinstance(node, int) or isinstance(node, bool) or node <= 0:
            raise FedtinaError(f"flwr supernode register gave no node id for SuperNode {i}: "
                               f"{' '.join(text.split())[:200]!r}")
        if node in mapping:
            raise FedtinaError(f"flwr supernode register gave node {node} to SuperNodes {mapping[node]} and {i}")
        mapping[node] = i
    return mapping


@dataclass
class RunResult:
    returncode: int
    wall_s: float
    log: Path


class Deployment:
    """`with Deployment(work_dir, supernodes=3, tls=True, auth=True) as d: d.run(project_dir, run_dir)`."""

    def __init__(self, work_dir: str | Path, supernodes: int, tls: bool = False, host: str = "127.0.0.1",
                 start_timeout_s: float = 60.0, superlink: str | None = None, auth: bool = False) -> None:
        """`superlink="host:port"`: join that SuperLink (insecure) instead of starting one; it must answer a TCP
        connect within 3 s, else one FedtinaError says so (no waiting on retries). `auth`: only SuperNodes whose
        keys were registered may connect (Flower allows it over TLS only)."""
        if supernodes < 1:
            raise FedtinaError(f"supernodes={supernodes}: need at least one SuperNode")
        check_security(tls, auth, superlink)
        self.superlink, self.auth = superlink, bool(auth)
        self.work_dir, self.n, self.tls, self.host = Path(work_dir), int(supernodes), bool(tls), host
        self.start_timeout_s = start_timeout_s
        self.flwr_home = self.work_dir / "flwr_home"
        self.procs: list[subprocess.Popen] = []
        self.port = 0
        self.certs: dict[str, Path] = {}
        self.keys: list[tuple[Path, Path]] = []   # per SuperNode: (private key, public key) when auth
        self.node_partitions: Path | None = None   # the node -> partition map's file when auth

    # ---------------------------------------------------------------- processes
    def _env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)   # flwr-serverapp / flwr-clientapp of this environment
        return {**os.environ, "FLWR_HOME": str(self.flwr_home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.work_dir / f"{name}.log"
        exe = str(Path(sys.executable).parent / args[0])
        with open(log, "w") as f:
            proc = subprocess.Popen([exe, *args[1:]], stdout=f, stderr=subprocess.STDOUT, env=self._env(),
                                    cwd=self.work_dir, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def __enter__(self) -> "Deployment":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.superlink:
            self.host, _, port = self.superlink.rpartition(":")
            if not self.host or not port.isdigit():
                raise FedtinaError(f"superlink={self.superlink!r}: need host:port")
            self.port = int(port)
            try:
                socket.create_connection((self.host, self.port), timeout=3.0).close()
            except OSError as e:
                raise FedtinaError(f"superlink={self.superlink!r}: nobody answers at {self.host}:{self.port} "
                                   f"({e.strerror or e}); start one (flower-superlink --insecure) or leave "
                                   f"superlink unset to start one here") from None
            self._write_profile()
            self._start_nodes()
            return
        security = ["--insecure"]
        if self.tls:
            self.certs = make_certificates(self.work_dir / "certs", self.host)
            security = ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                        "--ssl-keyfile", str(self.certs["key"])]
        if self.auth:
            security.append("--enable-supernode-auth")
        self.port = free_port(self.host)
        link, log = self._spawn("superlink", ["flower-superlink", *security, "--host", self.host, "--port",
                                              str(self.port), "--disable-runtime-dependency-installation",
                                              "--database", str(self.work_dir / "superlink.db")])
        _wait_for_port(self.host, self.port, link, self.start_timeout_s, "the SuperLink", log)
        self._write_profile()
        if self.auth:
            from fedtina.runtime.spec import write_node_partitions

            self.keys = make_node_keys(self.work_dir / "keys", self.n)
            answers = [self.flwr(f"register_{i}", "supernode", "register", str(public), PROFILE, "--format", "json")
                       for i, (_, public) in enumerate(self.keys)]
            self.node_partitions = write_node_partitions(self.work_dir / "node_partitions.json",
                                                         partition_map(answers))
        self._start_nodes()

    def _write_profile(self) -> None:
        """The `flwr` CLI's connection to this SuperLink, as the default of its FLWR_HOME."""
        profile = [f'[superlink.{PROFILE}]', f'address = "{self.host}:{self.port}"']
        profile += [f'root-certificates = "{self.certs["ca"]}"'] if self.tls else ["insecure = true"]
        (self.flwr_home / "config.toml").write_text("\n".join(["[superlink]", f'default = "{PROFILE}"', "",
                                                               *profile]) + "\n")

    def flwr(self, name: str, *args: str, timeout_s: float = 60.0) -> str:
        """`flwr <args>` against this SuperLink (its output in `<name>.log`); its stdout, or a FedtinaError."""
        log = self.work_dir / f"{name}.log"
        try:
            res = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], capture_output=True, text=True,
                                 env=self._env(), cwd=self.work_dir, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise FedtinaError(f"flwr {' '.join(args)} did not finish within {timeout_s:g} s") from None
        log.write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise FedtinaError(f"flwr {' '.join(args)} exited with code {res.returncode}; see {log}")
        return res.stdout

    def node_args(self, private_key: Path | None = None) -> list[str]:
        """`flower-supernode`'s options to reach this SuperLink (TLS, and the node's key when auth)."""
        args = ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
        args += ["--superlink", f"{self.host}:{self.port}", "--port", str(free_port(self.host))]
        return args + (["--auth-supernode-private-key", str(private_key)] if private_key else [])

    def _start_nodes(self) -> None:
        for i in range(self.n):
            key = self.keys[i][0] if self.auth else None
            self._spawn(f"supernode_{i}", ["flower-supernode", *self.node_args(key),
                                           "--node-config", f"partition-id={i} num-partitions={self.n}"])

    def run(self, project_dir: str | Path, run_dir: str | Path, timeout_s: float = 1800.0) -> RunResult:
        """`flwr run <project_dir> <profile> --stream --run-config 'run-dir="<run_dir>"'` (and, with auth,
        `node-partitions="<its map>"`), followed to its end."""
        log = self.work_dir / "flwr_run.log"
        exe = str(Path(sys.executable).parent / "flwr")
        config = f'run-dir="{Path(run_dir).resolve()}"'
        if self.node_partitions is not None:
            config += f' node-partitions="{self.node_partitions.resolve()}"'
        t0 = time.perf_counter()
        with open(log, "w") as f:
            try:
                rc = subprocess.run([exe, "run", str(project_dir), PROFILE, "--stream", "--run-config", config],
                                    stdout=f, stderr=subprocess.STDOUT, env=self._env(), cwd=str(project_dir),
                                    timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                raise FedtinaError(f"flwr run did not finish within {timeout_s:g} s; see {log}") from None
        return RunResult(rc, time.perf_counter() - t0, log)

    # ---------------------------------------------------------------- stopping
    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every started process group, SIGKILL to what is left after `grace_s`."""
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)   # the group's children too, even when the leader has exited
            proc.wait()
        self.procs.clear()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
