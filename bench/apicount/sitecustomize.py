"""Bench only (row 8 broken down): counts the Kubernetes API requests of the process it is loaded
into (the operator, started with this directory first on PYTHONPATH and
IMPORTWAVES_BENCH_APICOUNT=<file>): the kubernetes client's (the operator's own calls) and
aiohttp's (kopf's watches and patches), by client, method and path (object names kept), written
to <file> as JSON every second. Nothing is changed in what the process does."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from typing import Any

_OUT = os.environ.get("IMPORTWAVES_BENCH_APICOUNT", "")
_COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()


def _count(client: str, method: str, url: str) -> None:
    path = str(url).split("?", 1)[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    with _LOCK:
        _COUNTS[f"{client} {method.upper()} {path}"] += 1


def _dump() -> None:
    while True:
        time.sleep(1.0)
        with _LOCK:
            data = dict(_COUNTS)
        tmp = _OUT + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, _OUT)
        except OSError:
            pass


def _install() -> None:
    from kubernetes.client import rest

    orig = rest.RESTClientObject.request

    def request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        _count("kubernetes-client", method, url)
        return orig(self, method, url, *args, **kwargs)

    rest.RESTClientObject.request = request  # type: ignore[method-assign]
    threading.Thread(target=_dump, name="bench-apicount", daemon=True).start()
    try:
        import aiohttp
    except ImportError:
        return
    orig_req = aiohttp.ClientSession._request

    async def _request(self: Any, method: str, str_or_url: Any, *args: Any, **kwargs: Any) -> Any:
        _count("aiohttp(kopf)", method, str(str_or_url))
        return await orig_req(self, method, str_or_url, *args, **kwargs)

    aiohttp.ClientSession._request = _request  # type: ignore[method-assign]


if _OUT:
    _install()
