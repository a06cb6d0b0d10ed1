"""Thin web endpoints: they parse, call the use cases, and render."""
