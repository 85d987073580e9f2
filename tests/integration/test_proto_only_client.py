"""A client built only from proto/p2pchat/v1/*.proto talks to a real directory.

The .proto files are the contract: a third party who has nothing but them (no p2pchat Python
code) generates stubs with grpc_tools.protoc and must be able to use the directory. The client
runs in its own interpreter whose only addition to sys.path is the freshly generated code, and it
reports what it did as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.support.directory import PASSWORD, DirectoryProcess

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto" / "p2pchat" / "v1"
TIMEOUT = 60.0

CLIENT = textwrap.dedent(
    """
    import json
    import os
    import sys

    out_dir, port, ca_path, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sys.path.insert(0, out_dir)

    import grpc
    from p2pchat.v1 import directory_pb2 as pb
    from p2pchat.v1 import directory_pb2_grpc

    def inside(path):
        return os.path.realpath(path).startswith(os.path.realpath(out_dir) + os.sep)

    assert inside(pb.__file__), pb.__file__
    assert inside(directory_pb2_grpc.__file__), directory_pb2_grpc.__file__

    T = 10.0
    with open(ca_path, "rb") as f:
        ca = f.read()
    channel = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca))
    stub = directory_pb2_grpc.DirectoryServiceStub(channel)

    def code_of(call, request, **kw):
        try:
            call(request, timeout=T, **kw)
        except grpc.RpcError as err:
            return err.code().name
        return "OK"

    out = {}
    out["registered"] = [
        stub.Register(pb.RegisterRequest(username=n, password=password, address=a), timeout=T)
        .username
        for n, a in [("Zoe", "zoe.lan:50052"), ("yann", "10.1.2.3:6000"), ("xena", "")]
    ]
    # yann asks zoe first (contact consent), then leaves: zoe's AddContact accepts at once.
    yann = stub.Login(pb.LoginRequest(username="yann", password=password), timeout=T)
    ymd = (("authorization", "Bearer " + yann.session_token),)
    stub.AddContact(pb.AddContactRequest(username="zoe"), metadata=ymd, timeout=T)
    stub.Logout(pb.LogoutRequest(), metadata=ymd, timeout=T)
    login = stub.Login(pb.LoginRequest(username="zoe", password=password), timeout=T)
    md = (("authorization", "Bearer " + login.session_token),)
    out["login"] = {
        "username": login.username,
        "token_length": len(login.session_token),
        "expires_at": login.session_expires_at.seconds,
        "directory_root_is_the_trusted_ca": login.directory_ca_pem == ca,
    }
    added = stub.AddContact(
        pb.AddContactRequest(username="Yann"), metadata=md, timeout=T
    ).contact
    out["added"] = [added.username, added.address]
    listed = stub.ListContacts(pb.ListContactsRequest(), metadata=md, timeout=T).contacts
    out["contacts"] = [[c.username, c.address, c.online] for c in listed]
    found = stub.Lookup(pb.LookupRequest(username="yann"), metadata=md, timeout=T)
    out["lookup"] = {
        "username": found.contact.username,
        "address": found.contact.address,
        "online": found.contact.online,
        "has_last_seen": found.contact.HasField("last_seen"),
        "public_key_sha256": found.public_key_sha256,
    }
    out["lookup_non_contact"] = code_of(stub.Lookup, pb.LookupRequest(username="xena"), metadata=md)
    out["lookup_unknown"] = code_of(stub.Lookup, pb.LookupRequest(username="nobody"), metadata=md)
    stub.Logout(pb.LogoutRequest(), metadata=md, timeout=T)
    out["after_logout"] = code_of(stub.ListContacts, pb.ListContactsRequest(), metadata=md)
    channel.close()

    def origin(module):
        return getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")

    out["p2pchat_modules_outside"] = sorted(
        name
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "p2pchat" and not inside(origin(module))
    )
    out["our_modules"] = sorted(
        name
        for name in sys.modules
        if name.split(".")[0] in ("p2pchat_common", "p2pchat_directory", "p2pchat_agent", "tests")
    )
    print(json.dumps(out))
    """
)


def generate_stubs(tmp_path: Path) -> Path:
    """Copies the .proto files and runs protoc on them; returns the generated package root."""
    protos = tmp_path / "protos"
    (protos / "p2pchat" / "v1").mkdir(parents=True)
    copied = []
    for source in sorted(PROTO_DIR.glob("*.proto")):
        copied.append(shutil.copy(source, protos / "p2pchat" / "v1" / source.name))
    assert {Path(p).name for p in copied} >= {"common.proto", "directory.proto"}
    out = tmp_path / "generated"
    out.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={protos}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *map(str, copied),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    # protoc writes modules, not packages: make p2pchat and p2pchat.v1 regular packages so that
    # they cannot merge with (or lose to) another p2pchat package elsewhere on the path.
    for package in (out / "p2pchat", out / "p2pchat" / "v1"):
        (package / "__init__.py").touch()
    assert (out / "p2pchat" / "v1" / "directory_pb2_grpc.py").exists()
    return out


def test_client_generated_only_from_the_proto_files_uses_the_directory(tmp_path: Path) -> None:
    generated = generate_stubs(tmp_path)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    script = client_dir / "client.py"
    script.write_text(CLIENT)
    data = tmp_path / "directory"

    directory = DirectoryProcess(["--data-dir", str(data)])
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        result = subprocess.run(
            [
                sys.executable,
                str(script),
                str(generated),
                str(directory.port),
                str(data / "ca.pem"),
                PASSWORD,
            ],
            cwd=client_dir,  # not the repository: nothing of ours is importable from the cwd
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        exit_code = directory.terminate()
    finally:
        directory.kill()
        if directory.proc.stderr is not None:
            directory._drain.join(5)
            directory.proc.stderr.close()

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["registered"] == ["zoe", "yann", "xena"]
    assert report["login"]["username"] == "zoe"
    assert report["login"]["token_length"] >= 32
    assert report["login"]["expires_at"] > time.time()
    assert report["login"]["directory_root_is_the_trusted_ca"] is True
    assert report["added"] == ["yann", "10.1.2.3:6000"]
    assert report["contacts"] == [["yann", "10.1.2.3:6000", False]]
    assert report["lookup"] == {
        "username": "yann",
        "address": "10.1.2.3:6000",
        "online": False,
        "has_last_seen": True,  # yann logged in and out
        "public_key_sha256": "",
    }
    assert report["lookup_non_contact"] == "FAILED_PRECONDITION"
    assert report["lookup_unknown"] == "NOT_FOUND"
    assert report["after_logout"] == "UNAUTHENTICATED"
    assert report["p2pchat_modules_outside"] == []
    assert report["our_modules"] == []
    assert exit_code == 0
