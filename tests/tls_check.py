"""Run as a script by test_gateway_tls.py, with a Ray of its own started here on Serve's
Python proxy ingress (the one that terminates TLS): ``overstory serve --http ...
--tls-cert ... --tls-key ...`` deploys the door, and the official ``openai`` SDK reaches it
over HTTPS trusting only the test CA. Prints one JSON line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import ray
from ray import serve

from overstory.gateway.keys import create_key
from overstory.store import run_on_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(ca: str, cert: str, key: str) -> None:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    store = f"sqlite:///{tempfile.mkdtemp(prefix='ovs-tls-')}/history.db"
    port = _free_port()
    overstory = str(Path(sys.executable).with_name("overstory"))
    common = ["--address", address, "--namespace", "tls", "--store", store, "--json"]
    tls = ["--http", f"127.0.0.1:{port}", "--tls-cert", cert, "--tls-key", key]
    deployed = subprocess.run(
        [overstory, "serve", *common, *tls],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    url = json.loads(deployed.stdout.strip().splitlines()[-1])["http"]
    secret, _ = run_on_store(store, lambda s: create_key(s, "alice"))
    trusting = httpx.Client(verify=ca, timeout=30)
    deadline = time.monotonic() + 120
    while True:  # Serve's proxy answers once the replica is up
        try:
            if trusting.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the door did not come up over HTTPS"
        time.sleep(0.5)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, http_client=trusting)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "over TLS"}]
    )
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "streamed"}], stream=True
        )
        if chunk.choices
    )
    # Not trusting the CA: the certificate is refused. Plain HTTP: no answer.
    try:
        openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0).models.list()
        untrusted = "answered"
    except openai.APIConnectionError as e:
        untrusted = repr(e.__cause__)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            plain = f"answered {r.status}"
    except OSError as e:
        plain = type(e).__name__
    serve.shutdown()
    ray.shutdown()
    print(
        json.dumps(
            {
                "url": url,
                "reply": reply.choices[0].message.content,
                "streamed": streamed,
                "untrusted": untrusted,
                "plain": plain,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
