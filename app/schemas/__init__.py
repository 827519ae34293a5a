"""The wire contract: pydantic models only, no I/O."""
