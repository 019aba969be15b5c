"""The ``.capsule`` format: one reader, one verifier, one safe unpacker (ARCHITECTURE.md §3).

Every entry point that takes an artifact — ``ato verify``, publish's local check, the
registry's upload check, install, fetch, finalize, project and run — judges it here, so the
same bytes get the same verdict and the same error code everywhere. Where to look:

=================  ===============================================================================
``archive``        the outer tar: the writer, and the strict reader of its layout
``reader``         the small members, parsed and checked against signature.json (:class:`Capsule`)
``distribution``   the distribution ``capsule.toml``: ``[distribution]``, manifest_hash, chunk list
``signature``      ``signature.json``: the document, signed or not
``keys``           Ed25519 keys: ``did:key``, fingerprints, key files, rotation proofs
``payload``        ``payload.tar.zst``: zstd frames, chunk decoding under caps, the one scan
``payload_tar``    the payload tar read as a stream with bounded headers
``entries``        which payload entries may be unpacked (shared by the verifier and the unpacker)
``limits``         the decoded-payload ceiling (200 MiB, ``--force-large-payload``, config)
``verifier``       :func:`verify`: every check in one order, one :class:`Verdict`
``unpack``         :func:`unpack_payload`: descriptor-based extraction that never follows a symlink
=================  ===============================================================================

Trust *policy* (pins, revocation, rotation decisions) is not format and lives in
``pipeline.trust``; this package only says whether the cryptography holds. It imports only
the kernel (``pipeline.errors``, ``pipeline.envelope``, ``pipeline.paths``) and ``cas``, and
knows nothing of how chunks are stored.
"""

from stages.capsule.errors import CapsuleError
from stages.capsule.limits import NO_CEILING, Limits, consumer_limits
from stages.capsule.reader import Capsule, read_capsule
from stages.capsule.unpack import unpack_payload, write_root_file
from stages.capsule.verifier import (
    ArtifactStream,
    Verdict,
    placed,
    verdict_under,
    verify,
    verify_skeleton,
    verify_stream,
)

__all__ = ["NO_CEILING", "ArtifactStream", "Capsule", "CapsuleError", "Limits", "Verdict", "consumer_limits", "placed",
           "read_capsule", "unpack_payload", "verdict_under", "verify", "verify_skeleton", "verify_stream",
           "write_root_file"]
