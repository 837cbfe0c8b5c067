"""Helpers for the test suite: real servers and metric readers."""
