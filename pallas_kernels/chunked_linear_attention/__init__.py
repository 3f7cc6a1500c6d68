"""Chunked linear attention with per-head or per-channel decay (see api.py)."""
