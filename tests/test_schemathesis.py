"""thawd's API against its own document: schemathesis generates requests from daemon/openapi.json
(valid ones and invalid ones), sends them to a real thawd over its Unix socket, and checks every
reply: no 5xx from thawd itself, statuses, content types, headers and bodies as documented, valid
requests accepted and invalid ones refused.

The run is bounded (a fixed number of examples per operation, derandomized: the same requests
every run) so the suite stays fast.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter

from daemon.registry import NAME as NAME_PATTERN
from daemon.server import OPENAPI
from sandbox.cgroups import CgroupTree
from tests.thawd import Thawd, write_function

pytestmark = pytest.mark.privileged
NAME = "thaws0"
PROBE = "probe"  # the function deployed for the run
BASE_URL = "http://thawd"

# Operations whose body names a path on thawd's host (a function's directory, a model, an adapter):
# the document cannot say which paths exist, so a request valid by it may still be refused, with 400
# naming the path, and that is the answer the document gives for it.
NAMES_A_HOST_PATH = ["deployFunction", "updateFunction", "importLoraModel", "importLoraAdapter", "createContainer"]
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"max-examples": 8, "deterministic": True},
        "request-timeout": 60,
        "operations": [
            {
                "include-operation-id": NAMES_A_HOST_PATH,
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "409"]}},
            }
        ],
    }
)
SCHEMA = schemathesis.openapi.from_path(OPENAPI, config=CONFIG)


# -- HTTP over thawd's Unix socket, for requests ---------------------------------------------------
def unix_session(path: Path) -> requests.Session:
    """A requests session whose every URL goes to the Unix socket at `path` (requests speaks TCP only)."""

    class Connection(urllib3.connection.HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if isinstance(self.timeout, int | float):
                sock.settimeout(self.timeout)
            sock.connect(str(path))
            return sock

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Connection

    class Adapter(HTTPAdapter):
        def __init__(self) -> None:
            super().__init__()
            self.pool = Pool("thawd")

        def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> urllib3.HTTPConnectionPool:
            return self.pool

        def close(self) -> None:
            self.pool.close()
            super().close()

    session = requests.Session()
    session.mount(BASE_URL, Adapter())
    return session


@pytest.fixture(scope="module")
def thawd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thawd]:
    daemon = Thawd(tmp_path_factory.mktemp("schemathesis"), NAME, "10.241.0.0/24", max_frame="1M")
    try:
        with daemon.serving():
            yield daemon
    finally:
        CgroupTree(NAME).remove()


@pytest.fixture(scope="module")
def api(thawd: Thawd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[requests.Session]:
    source = write_function(tmp_path_factory.mktemp("probe"), "def handle(event, context):\n    return 'ok'\n")
    thawd.deploy(PROBE, source)
    with unix_session(thawd.socket) as session:
        yield session


@SCHEMA.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any]) -> Any:
    """Half of the reads and invocations with a valid name go to a deployed function, so that its
    200s are checked too (a random name is a 404). Deletes, updates and scaling keep random names:
    they would take the function away from the other operations."""
    operation, name = context.operation, (path_parameters or {}).get("name")
    reads = operation is not None and (operation.method.upper() == "GET" or "/invoke" in operation.path)
    if not reads or not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return st.just(path_parameters)  # an invalid name is what a negative case tests: keep it
    return st.sampled_from([path_parameters, {**path_parameters, "name": PROBE}])


@SCHEMA.parametrize()
def test_the_api_answers_as_its_document_says(case: schemathesis.Case[Any], api: requests.Session) -> None:
    if case.query and str(case.query.get("follow")).lower() in ("true", "1", "yes"):
        case.query["follow"] = "false"  # a follower streams until the client leaves: no reply to check
    case.call_and_validate(session=api, base_url=BASE_URL)
