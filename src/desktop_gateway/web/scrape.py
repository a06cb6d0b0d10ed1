"""``GET /metrics``: the Prometheus figures, for the scraper only.

The figures say nothing about a person, but how many desktops run and how a school's gateway is doing
are no one else's business either. With ``METRICS_TOKEN`` set, only a request carrying it as a bearer
token gets them; without it, only a request from this machine (loopback), the usual arrangement when
Prometheus or its agent runs beside the gateway. Anyone else gets the same 404 as for a path that does
not exist, so the endpoint is not advertised.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets

from sqlalchemy import case, func, select
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from desktop_gateway import metrics
from desktop_gateway.db.engine import is_database_failure
from desktop_gateway.db.models import Desktop, DesktopState
from desktop_gateway.gateway import Gateway
from desktop_gateway.settings import Secret

log = logging.getLogger("desktop_gateway.metrics")
DATABASE_TIMEOUT = 3  # seconds: a scrape must answer before Prometheus's own timeout (10 s by default)


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine's (``::ffff:127.0.0.1`` too); a name is not."""
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def may_scrape(
    token: Secret | None, authorization: str | None, client_host: str | None, forwarded_allow_ips: str
) -> bool:
    """Whether a request may read the figures.

    ``client_host`` is the address uvicorn reports: behind a proxy listed in ``FORWARDED_ALLOW_IPS``,
    the client the proxy names, so that a request through Apache from outside is not loopback. With
    ``*`` there, any client could name itself 127.0.0.1, so loopback alone then lets nobody in.
    """
    if token is not None:
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            given.strip().encode(), token.reveal().encode()
        )
    if "*" in (entry.strip() for entry in forwarded_allow_ips.split(",")):
        return False
    return is_loopback(client_host)


async def database_facts(gateway: Gateway) -> metrics.DatabaseFacts:
    """Running desktops by type and ports claimed, in one query; every configured type appears."""
    running = func.count(case((Desktop.state == DesktopState.RUNNING, 1)))
    query = select(Desktop.desktop_type, running, func.count(Desktop.host_port)).group_by(
        Desktop.desktop_type
    )
    async with gateway.engine.connect() as db:
        rows = (await db.execute(query)).all()
    by_type = dict.fromkeys(gateway.desktop_types, 0)
    ports = 0
    for desktop_type, count, claimed in rows:
        if count or desktop_type in by_type:
            by_type[desktop_type] = count
        ports += claimed
    low, high = gateway.settings.port_range
    return metrics.DatabaseFacts(by_type, ports, high - low + 1)


async def scrape(request: Request) -> Response:
    gateway: Gateway = request.state.gateway
    client = request.client.host if request.client else None
    settings = gateway.settings
    if not may_scrape(
        settings.metrics_token, request.headers.get("authorization"), client, settings.forwarded_allow_ips
    ):
        raise HTTPException(404)  # the router's own answer for a path that does not exist
    facts: metrics.DatabaseFacts | None = None
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT):
            facts = await database_facts(gateway)
    except Exception as exc:
        if not (isinstance(exc, TimeoutError) or is_database_failure(exc)):
            raise
        # The other figures matter most when the database is in trouble: they are served without these.
        log.warning("metrics without the database's figures: %s", type(exc).__name__)
    return Response(metrics.exposition(facts), headers={"Content-Type": metrics.CONTENT_TYPE})


routes = [Route("/metrics", scrape, methods=["GET"])]
