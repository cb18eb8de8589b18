"""Identities of the HTTPS API: projects, users, access keys (AK/SK) and roles.

The package's modules: ``model`` (the records, the name / network / action
checks and :class:`~engine.iam.model.Caller`, what the API server looks up on
every request), ``store`` (the tables in the engine's SQLite file, component
``iam`` of ``schema_migrations``), ``service`` (:class:`~engine.iam.service.Identities`,
the ``identities`` resource, :func:`~engine.iam.service.resolve_project`) and
``cli`` (``dew iam ...``). Built-in roles come from the configured services
(``ServiceSpec(roles="module:ATTR")``); the engine names no service.
Reference: docs/iam.md.

This module imports nothing: ``dew --help`` must stay cheap.
"""
