"""Asynchronous image requests: a durable queue in the database and the workers that drain it."""
