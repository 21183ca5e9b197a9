"""Which names a request's Host may give: the check against DNS rebinding (-allowed-hosts).

Why: a page of another site whose name its owner rebinds to this node's address (127.0.0.1, a LAN address) is
same-origin with the node in the browser: its requests carry `Origin: http://evil.example:8080`, `Sec-Fetch-Site:
same-origin` and `Host: evil.example:8080`, so the check against other sites' pages (api.cross_site_refusal) lets
them through, and the page could read every key, write, and drive the dashboard's actions. What gives it away is
the Host: a name that is not this node's. etcd's --host-whitelist, Django's ALLOWED_HOSTS and Vite's allowedHosts
refuse such requests the same way.

Rules:
- The edge asks `AllowedHosts.refusal` for every request, before its body is read (raftlib.server.edge); a Host
  not allowed gets 403 with one line naming -allowed-hosts and the node's advertised address, whose flag it is (a
  joining node shows the line as its own error: second review of rebind, F4), and X-Raft-Outcome: not-applied on
  a write.
- Allowed without configuration: IP literals (an IPv4 address, an IPv6 one in brackets, with or without a zone
  id, `[fe80::1%25eth0]`: there is no name to rebind), exactly `localhost` (/etc/hosts gives it before any DNS
  server is asked), this node's -h and -advertise, and the host of every member's advertised HTTP address in this
  node's configuration, since the nodes reach one another by those names (-forward, a join's redirect to the
  leader, GET /cluster/status, the feature level's questions, GET /cluster/keys). -allowed-hosts adds names; `*`
  allows every Host.
- This machine's names are not allowed unless listed (second review of rebind, F1): socket.getfqdn() is a reverse
  lookup, so a hostile resolver's PTR answer (`evil.example`) would become an allowed name, and a browser resolves
  the short socket.gethostname() through DNS when /etc/hosts does not give it. Whoever uses them lists them.
- Names under `.localhost` are not allowed unless listed (review of rebind, F1): only Chrome and Firefox resolve
  them to loopback themselves (RFC 6761 §6.3); Safari on macOS, and glibc with `hosts: files dns`, ask DNS, so
  whoever controls the resolver (a rogue Wi-Fi's DHCP) can rebind `rebind.localhost`.
- Names compare without case and without a trailing dot; the port is not compared (a rebound page uses the
  node's own port). A request without Host (HTTP/1.0) is allowed: a browser always sends one.
- A Host value is a host and an optional port, nothing else (`host_of`: a name of letters, digits, `_ . -`, or an
  IPv6 literal in brackets): the edge answers 400 to any other value (`malformed_host`: a comma list, spaces,
  `localhost:evil`, `[::1]evil`, non-ASCII, empty; review of rebind, F2), to two Host lines and to an HTTP/1.1
  request without Host (RFC 9112 §3.2), whatever -allowed-hosts says.
- Pure: no gevent and no I/O. A verdict is kept per Host value (a node hears a handful), at most MAX_VERDICTS of
  them, all forgotten when the configuration changes, so the check costs a dict lookup on the busy path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any

ANY_HOST = "*"
MAX_VERDICTS = 256  # Host values whose verdict is kept; past it the cache starts over (a client may send many)
MAX_SHOWN_HOST_CHARS = 100  # of a refused Host, in the refusal's line
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")  # a DNS name as hosts are named (underscores seen too)
# A Host value (RFC 9110 §7.2: uri-host [":" port]) as this node's clients send it: a name or an IPv4 address, or an
# IPv6 literal in brackets, with an optional zone id (RFC 6874's `%25eth0`, or the bare `%eth0` some clients send:
# second review of rebind, F3); then an optional port. ASCII only: a \xe9 is no letter here.
_HOST_VALUE = re.compile(r"(\[[0-9A-Fa-f:.]+(?:%(?:25)?[A-Za-z0-9._~-]+)?\]|[A-Za-z0-9_.-]+)(:[0-9]*)?")


def normal_name(name: str) -> str:
    """`name` as names are compared: lowercase, without one trailing dot (`localhost.` is `localhost`)."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def host_of(value: str) -> str | None:
    """The host of a Host value (RFC 9110 §7.2: uri-host [":" port]) as names are compared; an IPv6 literal keeps its
    brackets. None when the value, as a whole, is not a host and an optional port (`_HOST_VALUE`)."""
    match = _HOST_VALUE.fullmatch(value)
    return None if match is None else normal_name(match.group(1))


def shown_host(value: str) -> str:
    """A Host value as a one-line reason quotes it: repr (control and non-ASCII characters escaped), cut short."""
    cut = value[:MAX_SHOWN_HOST_CHARS] + ("..." if len(value) > MAX_SHOWN_HOST_CHARS else "")
    return repr(cut)


def malformed_host(value: str) -> str | None:
    """The 400's one line when the Host value `value` is not a host and an optional port (host_of), else None.
    The edge asks it for every request: one regex match."""
    if _HOST_VALUE.fullmatch(value) is not None:
        return None
    return f"malformed Host {shown_host(value)}: want a host name or IP address and an optional port"


def is_ip_literal(host: str) -> bool:
    """Whether `host` (as host_of gives it) is an IPv4 address or a bracketed IPv6 one (its zone id, if any, left
    out: `[fe80::1%25eth0]` is fe80::1 on eth0)."""
    try:
        if host.startswith("["):
            address = host[1:-1].partition("%")[0]
            return host.endswith("]") and ipaddress.ip_address(address).version == 6
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """-allowed-hosts LIST: comma-separated host names (spaces around them ignored), or `*`. Raises ValueError with
    one line naming the entry that is not a host name and why (not_a_name_because)."""
    names = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name = normal_name(entry)
        if name != ANY_HOST and not _NAME.fullmatch(name) and not is_ip_literal(name):
            raise ValueError(f"{entry!r} is not a host name: {not_a_name_because(entry)}")
        names.append(name)
    return tuple(names)


def not_a_name_because(entry: str) -> str:
    """Why an -allowed-hosts entry is not a host name, for its usage error: an IPv6 address (allowed without being
    listed), a non-ASCII name (the Host a client sends is its punycode form), or anything else (a port, a scheme, a
    pattern)."""
    try:
        is_ipv6 = ipaddress.ip_address(entry.partition("%")[0]).version == 6
    except ValueError:
        is_ipv6 = False
    if is_ipv6:
        return "IP addresses, IPv6 ones included, are always allowed: leave it out"
    if not entry.isascii():
        try:
            punycode = entry.encode("idna").decode("ascii")
        except UnicodeError:
            punycode = "xn--..."
        return f"give a non-ASCII name in punycode, as clients send it in Host ({punycode})"
    return f"give names without a scheme or a port (exact names; {ANY_HOST} alone allows every host)"


class AllowedHosts:
    """The names this node answers to (the module's rules). `membership()` gives the node's configuration (an
    object with `members`, each with an `http_address` "host:port"), read on each check: a new object means a new
    configuration. `node_address`: this node's advertised HTTP address, which a refusal names."""

    def __init__(self, configured: Iterable[str], own_names: Iterable[str], membership: Callable[[], Any], *,
                 node_address: str) -> None:
        configured = tuple(configured)
        self.node_address = node_address
        self.any_host = ANY_HOST in configured
        self.names = frozenset(normal_name(n) for n in (*configured, *own_names) if n and n != ANY_HOST)
        self._membership = membership
        self._seen_membership: Any = None
        self._member_hosts: frozenset[str] = frozenset()
        self._verdicts: dict[str, bool] = {}

    def refusal(self, host_value: str | None) -> str | None:
        """None when a request with this Host (None: none sent) may be served, else the 403's one line. A
        malformed value is refused here too, though the edge answers it 400 first (malformed_host)."""
        if self.any_host or host_value is None:
            return None
        membership = self._membership()
        if membership is not self._seen_membership:
            self._seen_membership = membership
            self._member_hosts = frozenset(host for m in getattr(membership, "members", ())
                                           if m.http_address and (host := host_of(m.http_address)) is not None)
            self._verdicts = {}
        verdict = self._verdicts.get(host_value)
        if verdict is None:
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts = {}
            verdict = self._verdicts[host_value] = self.allows(host_of(host_value))
        if verdict:
            return None
        return (f"Host {shown_host(host_value)} is not a name of this node (refused against DNS rebinding); "
                f"if it is one, give it in -allowed-hosts on the node at {self.node_address}")

    def served_names(self) -> str:
        """The start-up log's list of the Host names served (with `*`: say the check is off)."""
        if self.any_host:
            return "any Host (-allowed-hosts '*'): open to DNS rebinding"
        names = sorted(n for n in self.names if n != "localhost" and not is_ip_literal(n))
        return (f"the Host names {', '.join(['localhost', *names])}, any IP address and the members' advertised "
                "hosts (-allowed-hosts adds names: this machine's, if clients use them)")

    def allows(self, host: str | None) -> bool:
        """Whether `host` (as host_of gives it; None: no host) is allowed, the members' names as of the last
        refusal()."""
        return host is not None and (host in self.names or host in self._member_hosts or host == "localhost"
                                     or is_ip_literal(host))
