"""The cluster suite: the production shape as real processes on 127.0.0.1 (issue 24)."""
