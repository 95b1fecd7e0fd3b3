"""Tornado request handlers: pages, the send and history API, SSE streams, health, metrics."""
