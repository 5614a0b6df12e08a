"""A real Kubernetes control plane on loopback for the tests: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler from ``$KUBEBUILDER_ASSETS``.

Every component listens on 127.0.0.1 on a free port and keeps its data in one temporary
folder; ``stop()`` ends them by PID (SIGTERM, then SIGKILL) in reverse order. The API
server runs as a cluster would:

- a serving certificate for 127.0.0.1 signed by a CA of its own (``ca.crt``, which is
  also the ``kube-root-ca.crt`` that pods get), RBAC and the Node authorizer on,
  service-account tokens signed with a key of its own (TokenRequest works);
- static bearer tokens (``--token-auth-file``) for the admin (``system:masters``), the
  controller manager, the scheduler and the test kubelet (``system:node:<name>``), each
  with a kubeconfig of its own;
- an audit log of every request's user and response code (``audit.jsonl``), so a test
  can fail on any 403 the operator met.

Start order (as the binaries need): etcd, then kube-apiserver until ``/readyz`` (the
bootstrap RBAC roles exist), then the controller manager (garbage collector,
Deployments, ReplicaSets, namespaces, service-account tokens) and the scheduler.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NODE_NAME = "worldmesh-test-node"
#: The binaries a control plane needs in ``$KUBEBUILDER_ASSETS``.
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
#: Every default controller, and the one this build adds to upstream Kubernetes: its
#: ServiceAccount admission plugin projects the ConfigMap ``openshift-service-ca.crt``
#: into every pod's token volume (not optional), and this controller publishes it in
#: every namespace; without it no pod with a service-account token could start.
CONTROLLERS = "*,service-ca-certificate-publisher-controller"


def assets() -> tuple[Path | None, str]:
    """The folder holding every binary, or None and why not."""
    folder = os.environ.get("KUBEBUILDER_ASSETS", "")
    if not folder:
        return (
            None,
            "KUBEBUILDER_ASSETS is not set (`export KUBEBUILDER_ASSETS=$(../shared/kube/unpack)`)",
        )
    missing = [b for b in BINARIES if not os.access(Path(folder) / b, os.X_OK)]
    if missing:
        return None, f"KUBEBUILDER_ASSETS={folder} lacks {', '.join(missing)}"
    return Path(folder), ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> None:
    """ca.{crt,key}; apiserver.{crt,key} for 127.0.0.1 and localhost; sa.{key,pub}."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=worldmesh-test-ca", cwd=folder)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key",
             "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "apiserver.crt",
             cwd=folder)  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=folder)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)


@dataclass
class ControlPlane:
    bin_dir: Path
    workdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  #: by user name
    port: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.jsonl"

    def kubeconfig(self, user: str = "admin") -> Path:
        """A kubeconfig file for ``user`` (admin, kubelet, or a service account name that
        ``add_token_kubeconfig`` wrote)."""
        return self.workdir / f"{user}.kubeconfig"

    def write_kubeconfig(self, user: str, token: str) -> Path:
        path = self.kubeconfig(user)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
            "current-context": user,
        }
        path.write_text(json.dumps(config))
        return path

    # -- start ------------------------------------------------------------------------

    def start(self, timeout_s: float = 90.0) -> None:
        make_certificates(self.workdir)
        users = {
            "admin": ("admin", "system:masters"),
            "kube-controller-manager": ("system:kube-controller-manager", ""),
            "kube-scheduler": ("system:kube-scheduler", ""),
            "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
        }
        lines = []
        for key, (user, group) in users.items():
            token = self.tokens[key] = secrets.token_hex(16)
            lines.append(f'{token},{user},{user},"{group}"' if group else f"{token},{user},{user}")
        (self.workdir / "tokens.csv").write_text("\n".join(lines) + "\n")
        (self.workdir / "audit-policy.yaml").write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\n"
            "omitStages: [RequestReceived]\nrules:\n- level: Metadata\n"
        )
        self._start_etcd()
        self.port = free_port()
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers={self._etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={self.workdir}",
            f"--tls-cert-file={self.workdir / 'apiserver.crt'}",
            f"--tls-private-key-file={self.workdir / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer=https://127.0.0.1:{self.port}",
            f"--service-account-key-file={self.workdir / 'sa.pub'}",
            f"--service-account-signing-key-file={self.workdir / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            f"--audit-policy-file={self.workdir / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=batch",
            "--audit-log-batch-max-wait=100ms",
            "--audit-log-batch-buffer-size=100000",
        )
        for key in users:
            self.write_kubeconfig(key, self.tokens[key])
        self._wait("kube-apiserver", self._apiserver_ready, timeout_s)
        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={self.kubeconfig('kube-controller-manager')}",
            f"--authentication-kubeconfig={self.kubeconfig('kube-controller-manager')}",
            f"--authorization-kubeconfig={self.kubeconfig('kube-controller-manager')}",
            f"--service-account-private-key-file={self.workdir / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            "--use-service-account-credentials",
            "--leader-elect=false",
            "--secure-port=0",
            f"--controllers={CONTROLLERS}",
            # Pods whose node vanished are not ours to evict in tests.
            "--node-monitor-grace-period=40s",
        )
        self._spawn(
            "kube-scheduler",
            f"--kubeconfig={self.kubeconfig('kube-scheduler')}",
            f"--authentication-kubeconfig={self.kubeconfig('kube-scheduler')}",
            f"--authorization-kubeconfig={self.kubeconfig('kube-scheduler')}",
            "--leader-elect=false",
            "--secure-port=0",
        )

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self._etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self._spawn(
            "etcd",
            "--name=test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self._etcd_url}",
            f"--advertise-client-urls={self._etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=error",
        )
        self._wait("etcd", lambda: self._get(self._etcd_url + "/health") is not None, 30)

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            [str(self.bin_dir / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of pytest reaches it through stop() only
        )
        log.close()

    def _get(self, url: str, token: str | None = None) -> bytes | None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(url)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return bytes(response.read())
        except (urllib.error.URLError, OSError):
            return None

    def _apiserver_ready(self) -> bool:
        return self._get(self.url + "/readyz", self.tokens["admin"]) == b"ok"

    def _wait(self, name: str, ready: object, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready within {timeout_s} s: {self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # -- audit ------------------------------------------------------------------------

    def audit_events(self) -> Iterator[dict[str, object]]:
        """Every request the API server has logged so far (user, verb, URI, code)."""
        if not self.audit_log.exists():
            return
        with self.audit_log.open() as handle:
            for line in handle:
                with contextlib.suppress(json.JSONDecodeError):
                    yield json.loads(line)

    # -- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        self.processes.clear()
