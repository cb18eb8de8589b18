"""The HTTPS API: the official DEW SDKs' wire protocol over the services' functions.

The engine part is generic: TLS, AK/SK signature checks, identities and their
actions, rate limits, the error shape and the server. Each service package
declares its operations (``handlers/<service>/api.py``) as plain
:class:`~engine.api.operations.Operation` values; the API adds only the mapping.
"""
