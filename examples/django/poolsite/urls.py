"""URL routes of the example."""

from __future__ import annotations

from django.urls import path

from poolsite import views

urlpatterns = [
    path("inventory", views.inventory),
    path("health/pools", views.health_pools),
]
