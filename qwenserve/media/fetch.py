"""http(s) media fetched safely: every hop's address checked, the connection pinned to it, bytes,
redirects and time capped."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import httpx

from ..config import Settings
from ..protocol import bad_request


def _address_allowed(address: str, allowed_networks: list) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    if any(ip in network for network in allowed_networks):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)


class SafeFetcher:
    """http(s) only; every hop's host resolved and checked before connecting, and the connection made
    to the checked address (no second DNS answer can swap it); bytes and time capped."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.allowed_networks = [ipaddress.ip_network(n.strip(), strict=False)
                                 for n in settings.media_allowed_networks.split(",") if n.strip()]

    async def fetch(self, url: str, param: str) -> bytes:
        try:
            async with asyncio.timeout(self.settings.media_fetch_timeout_seconds):
                return await self._follow(url, param)
        except TimeoutError:
            raise bad_request(f"fetching the media took longer than {self.settings.media_fetch_timeout_seconds:g}s "
                              "(MEDIA_FETCH_TIMEOUT_SECONDS)", param, "media_fetch_timeout")
        except httpx.HTTPError as exc:
            raise bad_request(f"fetching the media failed: {type(exc).__name__}", param, "media_fetch_failed")
        except httpx.InvalidURL:  # what urlsplit lets through and httpx does not (a NUL, a very long URL)
            raise bad_request("media URL is not valid", param, "invalid_url")

    async def _follow(self, url: str, param: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            for _ in range(self.settings.media_max_redirects + 1):
                target, host_header, sni = await self._check(url, param)
                request = client.build_request("GET", target, headers={"Host": host_header},
                                               extensions={"sni_hostname": sni} if sni else {})
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise bad_request(f"fetching the media failed with HTTP {response.status_code}", param,
                                          "media_fetch_failed")
                    return await self._read_capped(response, param)
                finally:
                    await response.aclose()
        raise bad_request(f"too many redirects (MEDIA_MAX_REDIRECTS={self.settings.media_max_redirects})", param,
                          "media_fetch_failed")

    async def _check(self, url: str, param: str) -> tuple[str, str, str | None]:
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # an unclosed IPv6 bracket, a port out of range (a redirect's too)
            raise bad_request("media URL is not valid", param, "invalid_url")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_request("media URLs must be http or https", param, "unsupported_scheme")
        host = parts.hostname.lower()
        domains = self.settings.allowed_media_domain_list
        if domains and not any(host == d or host.endswith("." + d) for d in domains):
            raise bad_request(f"media host {host[:100]!r} is not in ALLOWED_MEDIA_DOMAINS", param, "media_host_refused")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):  # UnicodeError: a name IDNA cannot encode (a label too long)
            raise bad_request(f"media host {host[:100]!r} could not be resolved", param, "media_fetch_failed")
        addresses = [info[4][0] for info in infos]
        if not self.settings.media_allow_private_networks:
            if not addresses or not all(_address_allowed(a, self.allowed_networks) for a in addresses):
                raise bad_request("media URL points at a private, loopback or reserved address", param,
                                  "media_address_refused")
        address = addresses[0]
        literal = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{literal}:{port}").geturl()
        host_header = parts.netloc.rsplit("@", 1)[-1]
        return target, host_header, host if parts.scheme == "https" else None

    async def _read_capped(self, response: httpx.Response, param: str) -> bytes:
        limit = self.settings.max_media_bytes
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise bad_request(f"media is larger than {limit} bytes (MAX_MEDIA_BYTES)", param, "media_too_large")
            chunks.append(chunk)
        return b"".join(chunks)
