"""``/etc/os-release`` of a server: supported or not, and where its sshd lives (pure).

The supported list is the product's (PRODUCT.md, KPS). The defaults follow the
distribution: the config is ``/etc/ssh/sshd_config`` everywhere; sshd is
reloaded through systemd where the server has it, else restarted with
``service sshd restart`` (``service ssh restart`` on Debian and Ubuntu 14).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

# os-release IDs of the supported systems (EulerOS, CentOS, RedHat, SUSE, Debian,
# OpenSUSE, Oracle Linux, Fedora, Ubuntu, Huawei Cloud EulerOS, AlmaLinux, Rocky
# Linux, CentOS Stream, openEuler).
SUPPORTED_IDS = frozenset({
    "euleros", "hce", "centos", "rhel", "sles", "sled", "suse", "opensuse", "opensuse-leap",
    "opensuse-tumbleweed", "debian", "ol", "fedora", "ubuntu", "almalinux", "rocky",
    "openeuler",
})
SUSE_IDS = frozenset({"sles", "sled", "suse", "opensuse", "opensuse-leap",
                      "opensuse-tumbleweed"})
DEFAULT_SSHD_CONFIG = "/etc/ssh/sshd_config"


@dataclass(frozen=True)
class OsRelease:
    id: str
    version_id: str
    id_like: tuple[str, ...]
    pretty_name: str

    @property
    def supported(self) -> bool:
        return self.id in SUPPORTED_IDS

    @property
    def suse(self) -> bool:
        return self.id in SUSE_IDS or "suse" in self.id_like

    @property
    def name(self) -> str:
        return self.pretty_name or f"{self.id} {self.version_id}".strip() or "unknown"


def parse_os_release(text: str) -> OsRelease:
    """Parse the shell-style ``KEY=value`` lines (quotes allowed, comments ignored)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            words = shlex.split(raw)
        except ValueError:
            words = [raw.strip("\"'")]
        fields[key.strip()] = words[0] if words else ""
    return OsRelease(
        id=fields.get("ID", "").lower(),
        version_id=fields.get("VERSION_ID", ""),
        id_like=tuple(fields.get("ID_LIKE", "").lower().split()),
        pretty_name=fields.get("PRETTY_NAME", ""),
    )


def default_reload_command(os: OsRelease, has_systemd: bool) -> str:
    """How to make sshd read its config on this system."""
    service = "ssh" if os.id in ("debian", "ubuntu") or "debian" in os.id_like else "sshd"
    if os.id == "ubuntu" and os.version_id.startswith("14."):
        return "service ssh restart"
    if has_systemd:
        return f"systemctl reload {service}"
    return f"service {service} restart"
