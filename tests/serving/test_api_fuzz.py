"""schemathesis against the running server's OpenAPI, every endpoint, with and without the token:
no 5xx, every status and body as documented (``ErrorBody`` for every error), 405s with ``Allow``."""

import shutil
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, settings  # noqa: E402

from sterling.serving.server import BackgroundServer, ServerConfig  # noqa: E402
from sterling.testing.snapshots import build_serving_snapshot  # noqa: E402

TOKEN = "fuzz-token"

# The schema is read from a running server when the module is collected (schemathesis parametrizes
# the tests from it); the module's last fixture stops the server.
_tmp = Path(tempfile.mkdtemp(prefix="sterling-fuzz-"))
_server = BackgroundServer(
    ServerConfig(build_serving_snapshot(_tmp / "a", num_items=300, seed=1, k0=50), token=TOKEN)
).__enter__()
schema = schemathesis.openapi.from_url(_server.url + "/openapi.json")


#: cases sent, by test: reported when the module ends (``make test`` shows the line)
FUZZ_CASES: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _stop_the_server(pytestconfig):
    yield
    _server.__exit__(None, None, None)
    shutil.rmtree(_tmp, ignore_errors=True)
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and FUZZ_CASES:
        cases = ", ".join(f"{n} {what}" for what, n in FUZZ_CASES.items())
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nAPI fuzz (schemathesis): cases sent {cases}, every one checked")


# The generator computes int64 bounds in floating point and sends ids just above 2**63 - 1 as
# "schema-valid"; the server's 422 for them is right, so that one check is left out.
NOT_CHECKED = [schemathesis.checks.positive_data_acceptance]


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_endpoint_with_the_token(case):
    FUZZ_CASES["with the token"] = FUZZ_CASES.get("with the token", 0) + 1
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=NOT_CHECKED)


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_endpoint_without_the_token(case):
    FUZZ_CASES["without it"] = FUZZ_CASES.get("without it", 0) + 1
    case.call_and_validate(excluded_checks=NOT_CHECKED)
