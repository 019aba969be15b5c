"""The content-addressed store: digests, tree digest, chunking, chunk frames in pack files with one
index (``cas.packs``, ``cas.index``), verify, gc. The one-file-per-chunk layout of earlier versions
(``cas.objects``) is still read, and gc moves it into a pack.

Imports nothing from ``stages`` or ``pipeline``; everything above builds on it.
"""
