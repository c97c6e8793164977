"""ACL tokens and a CA for the tests and demos that need a secured agent: what an operator would do with the
consul CLI and openssl, done against a real agent (its master token is ROOT_TOKEN) and in a folder of the test's."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

from testkit.procs import Consul

ROOT_TOKEN = "3d1a7b3e-0000-4000-8000-00000000root"


ACL_HCL = (
    f'acl {{ enabled = true, default_policy = "deny", tokens {{ master = "{ROOT_TOKEN}", agent = "{ROOT_TOKEN}" }} }}'
)


def api(agent: Consul, method: str, path: str, body: object = None) -> object:
    req = urllib.request.Request(
        agent.address + path,
        method=method,
        headers={"X-Consul-Token": ROOT_TOKEN},
        data=json.dumps(body).encode() if body is not None else None,
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip() else None


def make_token(agent: Consul, rules: str) -> str:
    policy = api(agent, "PUT", "/v1/acl/policy", {"Name": f"policy-{uuid.uuid4().hex[:12]}", "Rules": rules})
    assert isinstance(policy, dict)
    token = api(agent, "PUT", "/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})
    assert isinstance(token, dict)
    return str(token["SecretID"])


def delete_token(agent: Consul, secret: str) -> None:
    req = urllib.request.Request(agent.address + "/v1/acl/token/self", headers={"X-Consul-Token": secret})
    with urllib.request.urlopen(req, timeout=5) as r:
        accessor = json.loads(r.read())["AccessorID"]
    api(agent, "DELETE", f"/v1/acl/token/{accessor}")


def writer_rules(name: str) -> str:
    return f'service "{name}" {{ policy = "write" }}\nnode_prefix "" {{ policy = "read" }}'


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=d,
    )


def make_cert(d: Path, ca: str, name: str, san: str) -> None:
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=d,
    )
