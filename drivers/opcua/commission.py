"""`edge-agent browse opcua`: the address space below a node, variables with data type and access level.

Uses the driver's own security setup (a config's `[equipment.connection]`), so a server that wants a signed
session or a user is browsed as the daemon will see it. Node ids come out in the `nsu=` form, which survives
a server renumbering its namespaces. The CLI reaches this module through the registry by name.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import structlog
from asyncua import Client, Node, ua

from drivers.opcua.config import OpcUaConnection, check_node_id, resolve_node_id
from drivers.opcua.security import explain, set_user, setup_security

OBJECTS = ua.NodeId(ua.Int32(ua.ObjectIds.ObjectsFolder))
MAX_NODES = 20000

log = structlog.get_logger("edge_agent.browse")


@dataclass(frozen=True)
class Variable:
    """One variable found: where it is, what it holds and what a client may do with it."""

    node: str  # nsu= form
    name: str  # its browse name
    path: str  # browse names from the start node, dot-joined
    data_type: str
    access: str  # "read", "read/write", "write" or "none"
    value: object = None


def nsu_id(node_id: ua.NodeId, namespaces: list[str]) -> str:
    """`nsu=URI;s=X` for a node outside namespace 0, else the plain `i=85` form."""
    text = node_id.to_string()
    if node_id.NamespaceIndex == 0:
        return text
    ident = text.split(";", 1)[1]
    return f"nsu={namespaces[node_id.NamespaceIndex]};{ident}"


async def _type_name(client: Client, node: Node) -> str:
    try:
        dtype = await node.read_data_type()
    except ua.UaError:
        return "?"
    if dtype.NamespaceIndex == 0 and isinstance(dtype.Identifier, int):
        return ua.ObjectIdNames.get(dtype.Identifier, str(dtype.Identifier))
    return (await client.get_node(dtype).read_browse_name()).Name


async def _access(node: Node) -> str:
    try:
        variant = (await node.read_attribute(ua.AttributeIds.UserAccessLevel)).Value
        level = int(variant.Value) if variant is not None else 0
    except ua.UaError:
        return "?"
    readable = bool(level & ua.AccessLevel.CurrentRead.mask)
    writable = bool(level & ua.AccessLevel.CurrentWrite.mask)
    return {(True, True): "read/write", (True, False): "read", (False, True): "write"}.get((readable, writable), "none")


async def browse(
    conn: OpcUaConnection, start: str, depth: int, state_dir: Path, equipment_id: str = "browse"
) -> list[Variable]:
    """Every variable below `start` (at most `depth` levels), in browse order."""
    # asyncua warns about every negotiated setting on stderr; browse prints its own result.
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    client = Client(conn.endpoint, timeout=conn.timeout_s)
    try:
        await setup_security(client, conn, state_dir, equipment_id, log)
        set_user(client, conn)
        await client.connect()
    except Exception as err:  # asyncua raises many kinds; the driver's explanation names the cause
        with contextlib.suppress(Exception):
            await client.disconnect()
        raise ConnectionError(await explain(err, conn)) from err
    try:
        namespaces = await client.get_namespace_array()
        root = client.get_node(resolve_node_id(check_node_id(start), namespaces))
        found: list[Variable] = []
        # From the Objects folder, the standard's own nodes (namespace 0: Server, Aliases) are noise.
        seen: set[ua.NodeId] = set()
        await _walk(client, root, "", depth, namespaces, found, seen, skip_ns0=root.nodeid == OBJECTS)
        return found
    finally:
        await client.disconnect()


async def _walk(
    client: Client,
    node: Node,
    path: str,
    depth: int,
    namespaces: list[str],
    found: list[Variable],
    seen: set[ua.NodeId],
    skip_ns0: bool,
) -> None:
    if depth < 0 or len(seen) >= MAX_NODES:
        return
    for child in await node.get_children():
        if child.nodeid in seen or (skip_ns0 and child.nodeid.NamespaceIndex == 0):
            continue
        seen.add(child.nodeid)
        name = (await child.read_browse_name()).Name
        where = f"{path}.{name}" if path else name
        node_class = await child.read_node_class()
        if node_class == ua.NodeClass.Method:
            continue  # its arguments are properties, not tags
        if node_class == ua.NodeClass.Variable:
            try:
                value = await child.read_value()
            except ua.UaError:
                value = None
            found.append(
                Variable(
                    nsu_id(child.nodeid, namespaces),
                    name,
                    where,
                    await _type_name(client, child),
                    await _access(child),
                    value,
                )
            )
        await _walk(client, child, where, depth - 1, namespaces, found, seen, skip_ns0)


def tag_name(browse_name: str, taken: set[str]) -> str:
    """A config tag name from a browse name (`Machine.SpindleSpeed` -> `machine_spindle_speed`), unique."""
    split = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", browse_name)
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", split).strip("_").lower()[:100] or "tag"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def stanzas(found: list[Variable]) -> str:
    """`[[equipment.tags]]` for every readable variable."""
    taken: set[str] = set()
    out = []
    for v in found:
        if v.access not in ("read", "read/write"):
            continue
        out.append(
            f'[[equipment.tags]]\nname = "{tag_name(v.name, taken)}"\nnode = "{v.node}"  # {v.data_type}, {v.access}\n'
        )
    return "\n".join(out)
