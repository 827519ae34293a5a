"""Prometheus metrics and OpenTelemetry tracing, each owned by one app instance.

Above the domain floor because they label what they count with its types (breaker states,
token usage); below every layer that reports through them.
"""
