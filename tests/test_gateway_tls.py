"""HTTPS at the door: ``overstory serve --http ... --tls-cert ... --tls-key ...``, the
options' refusals, and plain HTTP only where asked for (or on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_check
from tls_certs import make_certificates

from overstory.cli.main import main
from overstory.exceptions import ConfigError
from overstory.gateway.serve import Tls


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def test_a_certificate_and_key_are_checked_as_a_pair_before_anything_is_deployed(
    certs: dict[str, Path], tmp_path: Path
) -> None:
    Tls(str(certs["cert"]), str(certs["key"])).check()
    with pytest.raises(ConfigError, match="do not load"):
        Tls(str(certs["cert"]), str(certs["other_key"])).check()
    with pytest.raises(ConfigError, match=r"certificate file .* does not exist"):
        Tls(str(tmp_path / "none.pem"), str(certs["key"])).check()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="do not load"):
        Tls(str(garbage), str(certs["key"])).check()


def test_serve_refuses_tls_options_by_name_and_plain_http_where_others_reach_it(
    certs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key, other = str(certs["cert"]), str(certs["key"]), str(certs["other_key"])
    # Every case fails on the options, before a cluster is reached.
    cases = [
        (["--tls-cert", cert, "--tls-key", key], "need --http"),
        (["--plain-http"], "--plain-http: the door's TLS settings need --http"),
        (["--http", "0.0.0.0:8000"], "would serve plain HTTP"),
        (["--http", "10.1.2.3:8000"], "--plain-http to ask for plain"),
        (["--http", "h:80", "--tls-cert", cert], "--tls-cert needs --tls-key"),
        (["--http", "h:80", "--tls-key", key], "--tls-key needs --tls-cert"),
        (["--http", "h:80", "--tls-cert", cert, "--tls-key", key, "--plain-http"], "not both"),
        (["--http", "h:80", "--tls-cert", cert, "--tls-key", other], "do not load"),
    ]
    for args, expected in cases:
        assert main(["serve", *args]) == 2, args
        err = capsys.readouterr().err
        if expected == "not both":
            assert "--plain-http serves without TLS" in err
        else:
            assert expected in err, (args, err)


@pytest.mark.slow
def test_the_openai_sdk_reaches_the_door_over_https_with_a_ca_bundle(
    certs: dict[str, Path],
) -> None:
    result = run_check(
        "tls_check.py",
        *(str(certs[k]) for k in ("ca", "cert", "key")),
        env={"OVERSTORY_SERVE_INGRESS": "proxy"},  # the ingress that terminates TLS
        without="RAY_SERVE_",  # none of the session's Serve settings
    )
    assert result["url"].startswith("https://127.0.0.1:")
    assert "over TLS" in result["reply"]
    assert "streamed" in result["streamed"]
    assert "CERTIFICATE_VERIFY_FAILED" in result["untrusted"]
    assert result["plain"] != "answered 200"
