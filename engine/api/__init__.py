"""The HTTPS API: the official DEW SDKs' wire protocol over the services' functions.

The engine part is generic: TLS, AK/SK signature checks, identities and their
actions, rate limits, the error shape and the server. Each service package
declares its operations (``handlers/<service>/api.py``) as plain
:class:`~engine.api.operations.Operation` values; the API adds only the mapping.

Modules: ``operations`` (what a service declares, what a handler gets),
``principal`` (the caller, role catalogs), ``fields`` (request field readers),
``signing`` (SDK-HMAC-SHA256, pure), ``routing`` (raw-path matching), ``errors``
(the one error table), ``ratelimit`` (per-project limits on Redis), ``jobs`` (jobs
from calls, 202 on a long wait), ``tls`` (local CA and certificates), ``app`` (the
dispatcher and ``build_app``), ``server`` (``dew api``), ``testing`` (an in-process
server and a stand-in identity store for tests). Reference: docs/api.md.
"""
