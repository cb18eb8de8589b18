"""CSMS secrets: the list and a secret's page (metadata and versions: never a value).

A value is shown only when the user asks for it (a POST with the session's CSRF
token, so a link or a prefetch never reads one) and the role allows
ShowSecretVersion (``csms:secret:getValue``); the CSMS audits that read with the
user as the principal, exactly as over the API. Without that action the page has
no button and the value never reaches the browser.
"""

from __future__ import annotations

import re

from starlette.responses import Response

from engine.console.web import Page
from engine.errors import InvalidInput

PAGE_SIZE = 100
VERSION = re.compile(r"v[0-9]{1,9}|latest")


async def list_page(p: Page) -> Response:
    query = {"limit": str(PAGE_SIZE), "marker": p.query.get("marker") or ""}
    answer = (await p.caller.call("ListSecrets", query=query)).body
    return p.render("secrets.html", title="Secrets", secrets=answer["secrets"],
                    next_marker=(answer.get("page_info") or {}).get("next_marker"))


async def show_page(p: Page, revealed: dict[str, str] | None = None) -> Response:
    name = p.param("name")
    secret = (await p.caller.call("ShowSecret", params={"secret_name": name})).body["secret"]
    versions = []
    if p.caller.may("ListSecretVersions"):
        versions = (await p.caller.call("ListSecretVersions", params={
            "secret_name": name}, query={"limit": "100"})).body["version_metadatas"]
    return p.render("secret.html", title=f"Secret {secret['name']}", secret=secret,
                    versions=versions, revealed=revealed,
                    may_reveal=p.caller.may("ShowSecretVersion"))


async def reveal(p: Page) -> Response:
    version = p.form.get("version", "latest")
    if not VERSION.fullmatch(version):
        raise InvalidInput(f"version: give a version id such as v1, got {version[:20]!r}",
                           target="version")
    answer = (await p.caller.call("ShowSecretVersion", params={
        "secret_name": p.param("name"), "version_id": version})).body["version"]
    shown = answer.get("secret_string")
    revealed = {"version": str(answer["version_metadata"]["id"]),
                "value": shown if shown is not None else answer["secret_binary"],
                "kind": "text" if shown is not None else "Base64"}
    return await show_page(p, revealed)
