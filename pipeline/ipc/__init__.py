"""IPC v1.1's broker role (seed 003: "capsule-cli: service resolution, RefCount, token management,
schema validation, DAG integration"): capsules that import a service exported by another capsule
reach it through the broker, which checks every call.

=============  ===================================================================================
``protocol``   JSON-RPC 2.0 lines over Unix sockets, ``capsule/invoke``, the error codes
``tokens``     per-consumer tokens: mint, check, revoke
``messages``   JSON Schema validation of each call's args and result
``sockets``    where sockets live (``ATO_SOCKET_DIR``, 0700 dirs, the 107-byte limit)
``broker``     the broker process: endpoints, reference counting, grace periods, state for ps
``client``     starting the broker on demand and talking to it
``providers``  stopping a provider (a background run, or a plain process)
=============  ===================================================================================
"""
