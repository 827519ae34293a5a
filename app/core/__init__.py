"""The floor every layer stands on; it imports nothing of the gateway.

The error tree and the one error body (``errors.py``), key hashing (``security.py``), JSON
logs and the request id (``logging.py``), the allocator's tuning (``memory.py``).
"""
