"""Task webhooks (issue 16): per-key endpoints set by the admin, a durable outbox, signed deliveries."""
