"""Tenant API keys: create, authenticate (a keyed hash, cached per process and invalidated
through Redis), change, revoke. The admin key is checked at the HTTP edge (``app/api/deps.py``).
"""
