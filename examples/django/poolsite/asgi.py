"""ASGI entry point (uvicorn, daphne, hypercorn): instrumented as in wsgi.py, for its reasons."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

import poolwatch

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "poolsite.settings")
poolwatch.instrument()
application = get_asgi_application()
