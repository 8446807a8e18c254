"""OrthancLocalStore: metadata in process when given, everything else over loopback HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from rtharvest.edge.localstore import InProcessMetadata, OrthancLocalStore
from rtharvest.edge.loopback import LoopbackClient


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


def test_provenance_resolves_instance_then_series_in_process() -> None:
    instances = {"i1": {"HarvestId": "own"}, "i2": {}}
    series = {"s1": {"HarvestId": "h1", "HarvestHop": "RTSTRUCT->SERIES"}}
    puts: list[tuple[str, str]] = []

    def get_json(uri: str) -> Any:
        parts = uri.split("/")
        if parts[1] == "instances" and parts[3] == "series" and parts[2] in instances:
            return {"ID": "s1", "Instances": sorted(instances)}
        if parts[1] == "instances" and parts[2] in instances:
            return instances[parts[2]]
        if parts[1] == "series" and parts[2] in series:
            return series[parts[2]]
        raise LookupError(uri)

    store = OrthancLocalStore(NoHttp(), InProcessMetadata(get_json, lambda uri, body: puts.append((uri, body))))
    assert store.series_of("i2").orthanc_id == "s1" and store.series_of("i2").instances == {"i1", "i2"}
    assert store.provenance("i1") == {"HarvestId": "own"}
    assert store.provenance("i2") == {"HarvestId": "h1", "HarvestHop": "RTSTRUCT->SERIES"}
    store.set_series_metadata("s1", "HarvestId", "h1")
    assert puts == [("/series/s1/metadata/HarvestId", "h1")]
    with pytest.raises(LookupError):
        store.series_metadata("gone")


def test_lookup_is_one_instance_level_find() -> None:
    class Recording(LoopbackClient):
        def __init__(self) -> None:
            super().__init__("http://127.0.0.1:9", "")
            self.calls: list[tuple[str, str, Any]] = []

        def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
            self.calls.append((method, path, body))
            return ["oid-1"] if body["Query"]["SOPInstanceUID"] == "1.2.3" else []

    client = Recording()
    store = OrthancLocalStore(client)
    assert store.lookup("1.2.3") == "oid-1" and store.lookup("1.2.4") is None
    assert client.calls[0] == ("POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": "1.2.3"}})
