"""CURVE keys for the daemon's two sockets: only workers that hold an authorized key are heard.

ZeroMQ's CURVE (libsodium) authenticates and encrypts each connection; the
daemon is the server of both sockets and a ZAP handler (pyzmq's
`ThreadAuthenticator`) admits a worker only if its public key is in the
`authorized/` folder. Layout of `transport.keys_dir`, made on first start with
owner-only permissions (0700 folder, 0600 secret keys):

    server.key  server.key_secret   the daemon's keypair (a worker needs server.key)
    worker.key  worker.key_secret   the keypair of the workers the daemon spawns itself
    authorized/worker.key           public keys of workers allowed to connect
    clients/NAME.key(_secret)       keypairs made by `smartscope keys add NAME` for workers on other hosts

A worker on another host gets `server.key` and its own `NAME.key_secret`
(`smartscope worker --server-key server.key --client-key NAME.key_secret`).
Deleting `authorized/NAME.key` locks that worker out at its next connection.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def default_keys_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "smartscope" / "keys"


@dataclass(frozen=True)
class ServerKeys:
    """The daemon's keypair and the folder of public keys it admits."""

    public: bytes
    secret: bytes
    authorized_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    """What a worker needs: the daemon's public key and its own keypair."""

    server_public: bytes
    public: bytes
    secret: bytes


def ensure_keys(keys_dir: Path) -> Path:
    """The keys folder, made (atomically: daemons starting together agree on one set) if it is missing."""
    keys_dir = Path(keys_dir).expanduser()
    if (keys_dir / "server.key_secret").is_file():
        return keys_dir
    keys_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=keys_dir.parent))  # mkdtemp: mode 0700
    try:
        zmq.auth.create_certificates(staging, "server")
        zmq.auth.create_certificates(staging, "worker")
        (staging / "authorized").mkdir(mode=0o700)
        (staging / "clients").mkdir(mode=0o700)
        shutil.copy(staging / "worker.key", staging / "authorized" / "worker.key")
        for secret in staging.glob("*.key_secret"):
            secret.chmod(0o600)
        try:
            staging.rename(keys_dir)
        except OSError:  # another process made it first (or keys_dir exists, empty): use what is there
            if not (keys_dir / "server.key_secret").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return keys_dir


def server_keys(keys_dir: Path) -> ServerKeys:
    keys_dir = ensure_keys(keys_dir)
    public, secret = zmq.auth.load_certificate(keys_dir / "server.key_secret")
    return ServerKeys(public, secret, keys_dir / "authorized")


def client_keys(server_key_file: Path, client_secret_file: Path) -> ClientKeys:
    """A worker's keys from the daemon's public key file and the worker's secret key file."""
    for path in (server_key_file, client_secret_file):
        if not Path(path).is_file():
            raise ValueError(f"key file not found: {path}")
    server_public, _ = zmq.auth.load_certificate(server_key_file)
    public, secret = zmq.auth.load_certificate(client_secret_file)
    if secret is None:
        raise ValueError(f"{client_secret_file} holds no secret key (give the .key_secret file)")
    return ClientKeys(server_public, public, secret)


def local_worker_key_files(keys_dir: Path) -> tuple[Path, Path]:
    """(server.key, worker.key_secret): the key files of the workers the daemon spawns."""
    keys_dir = ensure_keys(keys_dir)
    return keys_dir / "server.key", keys_dir / "worker.key_secret"


def add_worker_key(keys_dir: Path, name: str) -> Path:
    """A new keypair for a worker on another host, authorized at once; returns its secret key file."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"worker key name must be letters, digits, - or _, got {name!r}")
    keys_dir = ensure_keys(keys_dir)
    clients = keys_dir / "clients"
    if (clients / f"{name}.key").exists():
        raise ValueError(f"a worker key named {name!r} exists already ({clients / name}.key)")
    public_file, secret_file = map(Path, zmq.auth.create_certificates(clients, name))
    Path(secret_file).chmod(0o600)
    shutil.copy(public_file, keys_dir / "authorized" / public_file.name)
    return secret_file


def serve_curve(sock: zmq.Socket, keys: ServerKeys) -> None:
    """Make a socket (before bind) a CURVE server: only authenticated, encrypted peers."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def connect_curve(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make a socket (before connect) a CURVE client of the daemon."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


class AuthorizedKeys:
    """ZAP credentials check: a client key is admitted if a file in the folder holds it (read at each
    connection, so a key added or removed takes effect without a restart); refusals are counted."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.refused = 0

    def callback(self, _domain: str, z85_key: bytes) -> bool:
        known = zmq.auth.load_certificates(self.folder) if self.folder.is_dir() else {}
        if z85_key in known:
            return True
        self.refused += 1
        return False


def start_authenticator(ctx: zmq.Context, keys: ServerKeys) -> tuple[ThreadAuthenticator, AuthorizedKeys]:
    """The ZAP handler of `ctx` (one per context), admitting the public keys in keys.authorized_dir."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    authorized = AuthorizedKeys(keys.authorized_dir)
    auth.configure_curve_callback(domain="*", credentials_provider=authorized)
    return auth, authorized
