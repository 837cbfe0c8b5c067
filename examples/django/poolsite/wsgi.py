"""WSGI entry point: where poolwatch is instrumented.

Why here and not in ``AppConfig.ready()``: ``ready()`` runs in every process that sets Django
up — ``manage.py migrate``, ``shell``, ``test``, ``collectstatic``, and the parent process of
``runserver``'s autoreloader — each of which would then start poolwatch's exporters (and,
with a Prometheus port, take the port the serving process needs). This module is loaded only
by what serves requests: gunicorn, uWSGI, mod_wsgi, or ``runserver`` itself (through
``WSGI_APPLICATION``). ``asgi.py`` does the same for ASGI servers. A Celery worker of the
project loads neither: instrument it in ``worker_process_init`` (see examples/celery).

``instrument()`` comes before ``get_wsgi_application()`` so that pools created while Django
loads the project are hooked from their birth; poolwatch hooks earlier ones too.
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

import poolwatch

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "poolsite.settings")
poolwatch.instrument()  # settings from the environment: OTEL_*, POOLWATCH_*
application = get_wsgi_application()
