"""``poolwatch demo``: the main job on an embedded default, with no external services.

``upstream`` is the loopback HTTP server the demo's HTTP clients talk to; ``workload``
runs every pool kind poolwatch knows against it (and SQLite or a given database, and
moto's DynamoDB when installed) in the shape of one scenario.
"""
