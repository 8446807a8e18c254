"""OrthancLocalStore: metadata in process when given, everything else over loopback HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from rtharvest.localstore import InProcessMetadata, OrthancLocalStore
from rtharvest.loopback import LoopbackClient


class NoHttp(LoopbackClient):
    """A loopback client that fails the test if it is used at all."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", "")

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        raise AssertionError(f"{method} {path} went over HTTP")


def test_metadata_goes_in_process_and_a_missing_instance_is_a_lookup_error() -> None:
    stored: dict[str, dict[str, str]] = {"abc": {"HarvestId": "h1"}}
    puts: list[tuple[str, str]] = []

    def get_json(uri: str) -> Any:
        oid = uri.split("/")[2]
        if oid not in stored or not uri.endswith("/metadata?expand"):
            raise LookupError(uri)
        return stored[oid]

    def put(uri: str, body: str) -> None:
        puts.append((uri, body))

    store = OrthancLocalStore(NoHttp(), InProcessMetadata(get_json, put))
    assert store.metadata("abc") == {"HarvestId": "h1"}
    store.set_metadata("abc", "HarvestHop", "PLAN->STRUCT")
    assert puts == [("/instances/abc/metadata/HarvestHop", "PLAN->STRUCT")]
    with pytest.raises(LookupError):
        store.metadata("gone")
