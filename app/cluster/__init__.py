"""State several gateway processes share through Redis: one client and one pub/sub listener per
process (``bus.py``). The upstream slots and breakers (``app/upstream/shared_*.py``) and the key
cache (``app/auth/keys.py``) build on it; without ``redis.url`` none of it exists and each process keeps
its own state."""
