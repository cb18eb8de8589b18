"""The audit log: its entries (filtered) and a check of its hash chain.

Through the KMS's audit operations (DewListAudit, DewVerifyAudit), with their
action; where the configured KMS does not serve them, the area is not shown and
its address answers 404.
"""

from __future__ import annotations

from starlette.responses import Response

from engine.console import filters as f
from engine.console.web import Page

SPEC = {"key": f.text, "secret": f.text, "operation": f.name, "actor": f.text,
        "outcome": f.choice("success", "failure"), "since": f.time, "until": f.time}
LIMIT = 200


async def list_page(p: Page, verdict: dict[str, object] | None = None) -> Response:
    chosen = f.read(p.query, SPEC)
    query = {k: (f.iso_z(v) if k in ("since", "until") else v) or ""
             for k, v in chosen.values.items()}
    answer = (await p.caller.call("DewListAudit", query={**query, "limit": str(LIMIT)})).body
    return p.render("audit.html", title="Audit", entries=answer["entries"], filters=chosen,
                    verdict=verdict, may_verify=p.caller.may("DewVerifyAudit"))


async def verify(p: Page) -> Response:
    verdict = (await p.caller.call("DewVerifyAudit")).body
    return await list_page(p, dict(verdict))
