"""A tiny shop's checkout, the reference for a service that takes payments: see clients/python/README.md."""
