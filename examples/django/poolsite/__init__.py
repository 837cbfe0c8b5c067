"""A minimal single-settings Django project instrumented by poolwatch (see wsgi.py)."""
