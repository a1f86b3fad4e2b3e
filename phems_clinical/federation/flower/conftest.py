"""Doctest collection: the Flower apps import ``flwr``, an optional dependency."""

try:
    import flwr  # noqa: F401
except ImportError:
    collect_ignore = ["client_app.py", "records.py", "server_app.py"]
