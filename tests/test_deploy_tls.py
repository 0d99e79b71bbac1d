"""A deployment as it runs across machines: TLS and SuperNode authentication, end to end.

Flower 1.41 authenticates SuperNodes this way: the SuperLink runs with
``--enable-supernode-auth`` (TLS required), each SuperNode's OpenSSH ECDSA public key
is registered through the Control API (``flwr supernode register``, done by
``fedcontrast server --auth-list-public-keys``), and a SuperNode signs its requests with
the private key (``--auth-supernode-private-key``). A SuperNode whose key was not
registered cannot activate and exits.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import secrets_on_disk
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client.commands import add_client_arguments as client_arguments
from client.node import node_config, supernode_command
from client.settings import NodeSettings, queue_root_certificates
from client.stub import QueueClient
from common.errors import UsageError
from common.runtime.flower_env import ProcessTree, flower_env, free_port
from server.app import queue_tls
from server.commands import add_server_arguments as server_arguments
from server.deploy import queue_tls_run_config, read_public_keys, superlink_command
from server.queue import NegativeQueue
from server.service import QueueServer

FEDCONTRAST = str(Path(sys.executable).parent / "fedcontrast")
SMALL = ["--rounds", "1", "--batch-size", "64", "--global-negatives", "256", "--width", "8",
         "--embedding-dim", "16", "--eval-every", "0", "--device", "cpu", "--min-nodes", "2",
         "--round-timeout", "90", "--wait-nodes-timeout", "60"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_credentials(folder: Path, nodes: int) -> dict[str, Path]:
    """A CA, the SuperLink's certificate for 127.0.0.1/localhost, and OpenSSH key pairs for nodes.

    Returns paths by name: ``ca``, ``cert``, ``key``, ``node0`` (private), ``node0.pub``, ...
    """
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("FedContrast test CA", ca_key, _name("FedContrast test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate("localhost", server_key, ca.subject, ca_key, ca=False)
    files = {"ca": ca.public_bytes(pem), "cert": server_cert.public_bytes(pem),
             "key": server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())}
    for i in range(nodes):
        # What `ssh-keygen -t ecdsa -b 384` writes: the format Flower loads on both sides.
        node_key = ec.generate_private_key(ec.SECP384R1())
        files[f"node{i}"] = node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption())
        files[f"node{i}.pub"] = node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" node{i}\n".encode()
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


def _parse(add_arguments, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> dict[str, Path]:
    return make_credentials(tmp_path_factory.mktemp("credentials"), nodes=3)


def test_superlink_enables_node_auth_and_leaves_keys_to_registration(credentials):
    cmd = superlink_command(_parse(
        server_arguments, "--ssl-ca-certfile", str(credentials["ca"]), "--ssl-certfile",
        str(credentials["cert"]), "--ssl-keyfile", str(credentials["key"]),
        "--auth-list-public-keys", str(credentials["node0.pub"]), str(credentials["node1.pub"])))
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(credentials["ca"].resolve())
    assert cmd[cmd.index("--ssl-keyfile") + 1] == str(credentials["key"].resolve())
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert "--auth-list-public-keys" not in cmd  # Flower 1.41 exits when given it


def test_node_keys_need_tls_and_existing_files(credentials, tmp_path):
    with pytest.raises(UsageError, match="--insecure"):
        superlink_command(_parse(server_arguments, "--insecure", "--auth-list-public-keys",
                                 str(credentials["node0.pub"])))
    with pytest.raises(UsageError, match="no such file"):
        superlink_command(_parse(
            server_arguments, "--ssl-ca-certfile", str(credentials["ca"]), "--ssl-certfile",
            str(credentials["cert"]), "--ssl-keyfile", str(credentials["key"]),
            "--auth-list-public-keys", str(tmp_path / "missing.pub")))


def test_public_keys_come_from_pub_files_and_lists(credentials, tmp_path):
    keys = [credentials[f"node{i}.pub"].read_text().strip() for i in range(3)]
    listing = tmp_path / "keys.csv"
    listing.write_text(f"{keys[1]},\n{keys[2]}\n")
    assert read_public_keys([credentials["node0.pub"], listing]) == keys
    (tmp_path / "empty.csv").write_text(" \n")
    with pytest.raises(UsageError, match="no public key"):
        read_public_keys([tmp_path / "empty.csv"])


def test_supernode_gets_tls_and_its_private_key_only(credentials):
    args = _parse(client_arguments, "--superlink", "127.0.0.1:9092", "--partition-id", "0",
                  "--num-partitions", "2", "--root-certificates", str(credentials["ca"]),
                  "--auth-supernode-private-key", str(credentials["node0"]))
    cmd = supernode_command(args, node_config(args), 9999)
    assert cmd[cmd.index("--root-certificates") + 1] == str(credentials["ca"].resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(credentials["node0"].resolve())
    assert "--insecure" not in cmd and "--auth-supernode-public-key" not in cmd  # deprecated in 1.41
    insecure = _parse(client_arguments, "--superlink", "h:1", "--partition-id", "0", "--num-partitions",
                      "1", "--insecure", "--auth-supernode-private-key", str(credentials["node0"]))
    with pytest.raises(UsageError, match="needs TLS"):
        supernode_command(insecure, node_config(insecure), 1)


def test_queue_tls_flows_from_both_command_lines_to_the_queue_channel(credentials):
    server = _parse(server_arguments, "--ssl-ca-certfile", str(credentials["ca"]), "--ssl-certfile",
                    str(credentials["cert"]), "--ssl-keyfile", str(credentials["key"]))
    tls = queue_tls(queue_tls_run_config(server))  # what the ServerApp serves the queue with
    client = _parse(client_arguments, "--superlink", "127.0.0.1:9092", "--partition-id", "0",
                    "--num-partitions", "1", "--root-certificates", str(credentials["ca"]))
    node = NodeSettings.from_node_config(node_config(client))  # what the ClientApp reads
    ca = queue_root_certificates(node, queue_tls=True)
    token = "node-token-0123456789"
    with QueueServer(NegativeQueue(8, 4), {token: 0}, tls=tls) as queue:
        with QueueClient(queue.address, token, root_certificates=ca, retries=0) as verified:
            assert verified.pull(1, max_age=1) is not None
        with QueueClient(queue.address, token, retries=0) as in_clear:
            assert in_clear.pull(1, max_age=1) is None  # the queue speaks TLS only


def test_the_serverapp_reads_queue_tls_from_absolute_paths_only(credentials):
    assert queue_tls({"queue-ssl-certfile": "", "queue-ssl-keyfile": ""}) is None
    with pytest.raises(ValueError, match="go together"):
        queue_tls({"queue-ssl-certfile": str(credentials["cert"])})
    with pytest.raises(ValueError, match="absolute"):
        queue_tls({"queue-ssl-certfile": "cert", "queue-ssl-keyfile": str(credentials["key"])})
    with pytest.raises(ValueError, match="missing.key"):
        queue_tls({"queue-ssl-certfile": str(credentials["cert"]),
                   "queue-ssl-keyfile": str(credentials["key"].parent / "missing.key")})


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else f"(no {path.name})"


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_tls_run_admits_registered_nodes_only(credentials, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    # One thread per torch process: the cores are shared by every process here.
    env = {**flower_env(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    server_log = tmp_path / "server.log"
    tree = ProcessTree()

    def client(i: int) -> subprocess.Popen:
        return tree.start(
            [FEDCONTRAST, "client", "--superlink", address, "--root-certificates", str(credentials["ca"]),
             "--auth-supernode-private-key", str(credentials[f"node{i}"]),
             "--partition-id", str(i % 2), "--num-partitions", "2", "--client-id", f"c{i}",
             "--state-dir", str(tmp_path / f"state{i}"), "--flwr-home", str(tmp_path / f"home{i}")],
            env=env, log=tmp_path / f"client{i}.log", cwd=tmp_path)

    try:
        server = tree.start(
            [FEDCONTRAST, "server", "--host", "127.0.0.1", "--port", str(port),
             "--ssl-ca-certfile", str(credentials["ca"]), "--ssl-certfile", str(credentials["cert"]),
             "--ssl-keyfile", str(credentials["key"]),
             "--auth-list-public-keys", str(credentials["node0.pub"]), str(credentials["node1.pub"]),
             "--out", str(run), "--flwr-home", str(tmp_path / "server-home"), *SMALL],
            env=env, log=server_log, cwd=tmp_path)
        # A SuperNode whose key is not registered yet exits: start them after registration.
        deadline = time.monotonic() + 180
        while "2 SuperNode keys registered" not in _log(server_log):
            assert server.poll() is None, _log(server_log) + _log(run / "superlink.log")
            assert time.monotonic() < deadline, "the keys were not registered:\n" + _log(server_log)
            time.sleep(0.5)
        intruder = client(2)  # a key the SuperLink was not given
        members = [client(0), client(1)]

        assert intruder.wait(timeout=120) != 0, _log(tmp_path / "client2.log")
        assert "Failed to activate SuperNode" in _log(tmp_path / "client2.log")
        assert server.wait(timeout=300) == 0, _log(server_log) + _log(run / "server.log")
        assert all(m.poll() is None for m in members)  # still serving the federation

        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        assert [(r["round"], r["counted"], r["replied"]) for r in rows] == [(1, 1, 2)]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and len(summary["contributors"]) == 2
        # The queue was served with TLS (the SuperLink's certificate) and used: the clients
        # could only reach it through channels verified with --root-certificates.
        assert summary["queue_tls"] is True
        assert re.search(r"queue service listening on 127\.0\.0\.1:\d+ \(TLS\)",
                         (run / "server.log").read_text(errors="replace"))
        # round 1's pulls were answered (no miss) with no row yet; its pushes all arrived
        assert rows[0]["global_misses"] == 0 and rows[0]["pushed_rows"] > 0
        assert rows[0]["push_failures"] == 0
        assert summary["privacy"]["dp"] is False and summary["privacy"]["note"]
    finally:
        tree.stop()
    # Neither the queue tokens nor a line of a private key reached a file of the run, a log,
    # the clients' state or Flower's homes (the keys are read where they are).
    # (Lines holding private bytes: the PKCS#8 key's second, the OpenSSH keys' last.)
    keys = [credentials["key"].read_bytes().splitlines()[2],
            *(credentials[f"node{i}"].read_bytes().splitlines()[-2] for i in range(3))]
    assert secrets_on_disk(tmp_path, keys) == []
