"""KPS key pairs: the list, a pair's page with the servers it is bound to, and unbind
(ListKeypairs, ListKeypairDetail, DewListServers, DewShowServer,
DisassociateKeypair: the engine logs in with the pair's managed private key)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from engine.console.web import Page
from engine.errors import InvalidInput

PAGE_SIZE = 100
MAX_SERVERS = 200  # servers looked at for a pair's bindings


async def list_page(p: Page) -> Response:
    query = {"limit": str(PAGE_SIZE), "marker": p.query.get("marker") or ""}
    answer = (await p.caller.call("ListKeypairs", query=query)).body
    pairs = [item["keypair"] for item in answer["keypairs"]]
    return p.render("keypairs.html", title="Key pairs", keypairs=pairs,
                    next_marker=(answer.get("page_info") or {}).get("next_marker"))


async def show_page(p: Page) -> Response:
    name = p.param("name")
    pair = (await p.caller.call("ListKeypairDetail", params={"keypair_name": name})).body[
        "keypair"]
    return p.render("keypair.html", title=f"Key pair {pair['name']}", keypair=pair,
                    servers=await _bound(p, pair["name"]),
                    may_unbind=p.caller.may("DisassociateKeypair"))


async def _bound(p: Page, name: str) -> list[dict[str, Any]] | None:
    """The servers this pair is bound to (None: the user may not list servers)."""
    if not (p.caller.may("DewListServers") and p.caller.may("DewShowServer")):
        return None
    servers = (await p.caller.call("DewListServers")).body["servers"][:MAX_SERVERS]
    out = []
    for server in servers:
        shown = (await p.caller.call("DewShowServer", params={
            "server_id": str(server["id"])})).body["server"]
        if name in (shown.get("keypairs") or []):
            out.append(shown)
    return out


async def unbind(p: Page) -> Response:
    server_id = p.form.get("server_id", "")
    if not server_id or len(server_id) > 64:
        raise InvalidInput("server: choose the server to unbind from", target="server_id")
    result = await p.caller.call("DisassociateKeypair", body={"server": {"id": server_id}})
    return p.redirect(f"/tasks/{result.body.get('task_id') or result.task_id}", "unbinding")
