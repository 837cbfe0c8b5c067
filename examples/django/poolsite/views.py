"""Views: one calls an upstream through a module-level (pooled) requests Session."""

from __future__ import annotations

import dataclasses

import requests
from django.conf import settings
from django.http import HttpRequest, JsonResponse

import poolwatch

# One Session per process: its urllib3 pool keeps connections to the upstream alive across
# requests. poolwatch reports it as pool.kind "requests", named after the upstream.
_session = requests.Session()


def inventory(request: HttpRequest) -> JsonResponse:
    response = _session.get(f"{settings.UPSTREAM_URL}/inventory", timeout=5)
    return JsonResponse({"upstream_status": response.status_code})


def health_pools(request: HttpRequest) -> JsonResponse:
    return JsonResponse([dataclasses.asdict(pool) for pool in poolwatch.pools()], safe=False)
