"""The Payments gRPC server. Run it with `python -m server`."""
