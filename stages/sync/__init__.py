"""The ``.sync`` format (seed 003: "immediate payload display + TTL updates"): one file of data that
keeps itself fresh.

A ``.sync`` is a ZIP of stored members — ``manifest.toml``, ``payload`` and sync-rs's optional
``sync.wasm``, ``context.json`` and ``sync.proof`` — whose manifest says what the payload is
(MIME type, display extension), when it was made, how long it stays fresh (``policy.ttl``) and,
as an ato extension, where the next version is published (``[source] url``). A signed package
names its signer in ``meta.created_by`` (a ``did:key``) and signs every member.

=============  ======================================================================
``manifest``   ``manifest.toml``: the keys and their rules
``signature``  ``[signature]``: what is signed, signing, checking
``archive``    the ZIP: the strict reader/verifier (:func:`read_sync`) and the writer
``build``      :func:`build_sync`: one payload file -> a ``.sync``
=============  ======================================================================

Whether a verified package's signer is trusted, and how a package is opened and refreshed, is
not format: see :mod:`pipeline.trust` and :mod:`pipeline.runtime.sync_package`.
"""

from stages.sync.archive import SyncPackage, read_sync
from stages.sync.build import build_sync

__all__ = ["SyncPackage", "build_sync", "read_sync"]
