"""Settings of the example: one file, no database, no installed apps.

poolwatch hooks SQLAlchemy and urllib3 pools (requests, boto3); Django's own database
connections are not one of them, so this example has none and uses a requests Session.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "poolwatch-example-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "poolsite.urls"
WSGI_APPLICATION = "poolsite.wsgi.application"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# The upstream service the views call through one pooled requests Session.
UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8080")
