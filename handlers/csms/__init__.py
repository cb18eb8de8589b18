"""CSMS: secrets, their versions and stages, scheduled deletion and rotation.

The package's modules: ``service`` (``SecretsService`` and the rotation job),
``model`` (pure checks and rules), ``store``, ``envelope`` (values sealed under
data keys), ``rotation`` (the staged rotation state machine), ``rotators``
(PostgreSQL and MySQL/MariaDB password changes), ``cli``, ``demo``,
``schedules``, ``api`` (the HTTPS API), ``roles``. Reference: docs/csms.md.
"""

from engine.services import ServiceSpec

SERVICE = ServiceSpec(
    "csms",
    title="CSMS: secrets, versions, stages, rotation",
    commands={"secrets": "CSMS: secrets, versions, stages, rotation"},
    cli="handlers.csms.cli",
    jobs="handlers.csms.service",
    demo="handlers.csms.demo",
    schedules="handlers.csms.schedules",
    settings="handlers.csms.config:CsmsSettings",
    api="handlers.csms.api",
    roles="handlers.csms.roles:CATALOG",
)
