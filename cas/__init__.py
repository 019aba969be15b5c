"""The content-addressed store: digests, tree digest, chunking, objects, verify, gc.

Imports nothing from ``stages`` or ``pipeline``; everything above builds on it.
"""
