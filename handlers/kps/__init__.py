"""KPS: SSH key pairs, and binding them to servers over SSH.

The package's modules: ``service`` (``KpsService`` and the ``kps.*`` jobs),
``keys`` (key formats), ``authorized_keys``, ``sshd_config``, ``os_release``
(pure edits and decisions), ``ssh`` (the asyncssh adapter), ``store``, ``cli``,
``demo``, ``api`` (HTTPS, with ``roles``). Reference: docs/kps.md.
"""

from engine.services import ServiceSpec

SERVICE = ServiceSpec(
    "kps",
    title="KPS: SSH key pairs bound to servers",
    commands={
        "keypairs": "KPS: SSH key pairs, bound to servers",
        "servers": "KPS: servers key pairs are bound to",
    },
    cli="handlers.kps.cli",
    jobs="handlers.kps.service",
    demo="handlers.kps.demo",
    settings="handlers.kps.config:KpsSettings",
    api="handlers.kps.api",
    roles="handlers.kps.roles:CATALOG",
)
