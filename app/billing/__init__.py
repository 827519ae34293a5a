"""Pricing and the ledger: what requests cost and the record of what was charged."""
