"""Writing a model assignment into an existing ``pipeline.toml``, keeping the user's file.

The cycle (issue 15) points a persona at the model a fine-tuning job made. It edits the
file with tomlkit (the ``cycle`` extra, imported only here and only when called), which
keeps comments, blank lines, key order and quoting of everything it is not asked to
change. Where tomlkit alone would move a comment, this module steps in: a comment (and
the blank lines around it) between the end of one table and the next header belongs,
in tomlkit's model, to the first table, so a key or table added after that table would
land below the comment; here the comment is kept directly above the header it precedes.
Lines added to a file whose lines all end in CRLF end in CRLF too.

The edit is checked before the file is touched: the new text must load with
:func:`pipeline.config.load_config` and assign what was asked. The old file is then
copied to ``<name>.bak`` (replacing an older backup: one generation is kept) and the
new text written atomically (:func:`pipeline.runs.atomic_write_text`), with the old
file's permission bits.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, Fix

if TYPE_CHECKING:
    from tomlkit.container import Container
    from tomlkit.items import Item, Table
    from tomlkit.toml_document import TOMLDocument

ENDPOINT_KEYS = ("base_url", "model", "api_key_env")
"""The keys an endpoint table written here has (``api_key_env`` only when given)."""
_OTHER_SLOTS = ("default", "director", "moderator", "judge", "finetune")


def backup_path(config_path: Path) -> Path:
    """Where :func:`assign_role_model` keeps the previous file: ``<name>.bak`` beside it
    (``pipeline.toml`` → ``pipeline.toml.bak``)."""
    return config_path.with_name(config_path.name + ".bak")


def assign_role_model(
    config_path: Path,
    *,
    role: str,
    endpoint_name: str,
    base_url: str,
    model: str,
    api_key_env: str | None,
) -> Path:
    """Make role ``role`` use ``model`` at ``base_url`` in the config file ``config_path``.

    Two changes, everything else kept byte for byte:

    - ``[endpoints.<endpoint_name>]`` gets ``base_url``, ``model`` and ``api_key_env`` (the
      name of the variable holding the key, never a key; left out when None: a server
      that needs no key). A new table goes after the last endpoint table (or, with no
      ``endpoints`` at all, at the end of the file). An existing one is edited in place:
      those keys keep their position and end-of-line comments, and its other keys
      (``structured_output``, ``params``, ``embedded``, ``gguf``...) are removed, since they
      described the model it named before (the backup keeps them).
    - ``assign.roles.<role> = "<endpoint_name>"``: set in place when the role has an
      entry, added after the last entry otherwise; ``[assign]``/``[assign.roles]`` are
      created when missing (``assign.roles`` in an inline ``assign`` table stays inline).

    Returns:
        The backup of the file as it was: ``<name>.bak`` (:func:`backup_path`), which
        replaces an older backup of that name.

    Raises:
        ConfigError: the file is missing, unreadable or not TOML; tomlkit is not installed;
            ``assign.roles`` is a list (by position: which position the role speaks at
            is not known here) or neither list nor table; ``endpoint_name`` names an
            endpoint that something other than this role is assigned to (replacing it
            would switch that too); the edited file would not load (then nothing is
            written); or the file or its backup cannot be written.
    """
    tomlkit = _tomlkit()
    from tomlkit.exceptions import TOMLKitError

    target = config_path.resolve()  # a symbolic link stays one: its target is rewritten
    try:
        old_text = target.read_bytes().decode("utf-8")  # newlines exactly as they are
    except FileNotFoundError as e:
        raise ConfigError(
            f"{config_path}: no such config file",
            fix=Fix("name an existing pipeline.toml with {}", ("config",)),
            path=config_path,
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config_path}: cannot read it ({e})", path=config_path) from e
    from .config import load_config

    try:
        load_config(target)
    except ConfigError as e:
        raise ConfigError(
            f"{e.problem}; it does not load as it is, so no model was assigned",
            fix=(*e.fixes, Fix("fix the file first")),
            path=config_path,
        ) from e
    try:
        doc = tomlkit.parse(old_text)
    except TOMLKitError as e:  # pragma: no cover - TOML that tomllib reads, tomlkit not
        raise ConfigError(
            f"{config_path}: not valid TOML ({e})", fix=Fix("fix the file"), path=config_path
        ) from e
    _refuse_shared(config_path, doc.unwrap(), role, endpoint_name)
    try:
        _set_endpoint(doc, endpoint_name, base_url, model, api_key_env)
        _set_role(config_path, doc, role, endpoint_name)
        new_text = tomlkit.dumps(doc)
        if "\r\n" in old_text and "\n" not in old_text.replace("\r\n", ""):
            new_text = re.sub(r"(?<!\r)\n", "\r\n", new_text)  # the new lines as the old
    except TOMLKitError as e:  # pragma: no cover - a layout tomlkit cannot edit
        raise ConfigError(
            f"{config_path}: cannot edit this file's layout ({e})",
            fix=Fix(f"add the entry by hand: [endpoints.{endpoint_name}], assign.roles"),
            path=config_path,
        ) from e
    _check(config_path, target, new_text, role, endpoint_name, base_url, model, api_key_env)
    mode = stat.S_IMODE(target.stat().st_mode)
    backup = backup_path(target)
    from .runs import atomic_write_text

    try:
        atomic_write_text(backup, old_text)
        os.chmod(backup, mode)
        atomic_write_text(target, new_text)
        os.chmod(target, mode)
    except OSError as e:
        raise ConfigError(f"{config_path}: cannot write it ({e})", path=config_path) from e
    return backup


def _tomlkit() -> Any:
    try:
        import tomlkit
    except ImportError as e:
        raise ConfigError(
            "writing pipeline.toml needs the tomlkit package, which is not installed",
            fix=Fix("pip install 'converse-pipeline[cycle]'"),
        ) from e
    return tomlkit


# -- checks -------------------------------------------------------------------------------


def _refuse_shared(path: Path, data: dict[str, Any], role: str, name: str) -> None:
    """Refuse to change an endpoint that other slots use too."""
    if name not in (data.get("endpoints") or {}):
        return
    assign = data.get("assign") or {}
    users = [f"assign.{slot}" for slot in _OTHER_SLOTS if assign.get(slot) == name]
    roles = assign.get("roles")
    if isinstance(roles, list):
        users += [f"assign.roles[{i}]" for i, v in enumerate(roles) if v == name]
    elif isinstance(roles, dict):
        users += [f"assign.roles.{k}" for k, v in roles.items() if v == name and k != role]
    if users:
        raise ConfigError(
            f"{path}: endpoints.{name} is also used by {', '.join(users)}; "
            f"changing its model would change theirs",
            fix=Fix("choose another endpoint name, or point those at another endpoint first"),
            path=path,
        )


def _check(
    path: Path,
    target: Path,
    text: str,
    role: str,
    name: str,
    base_url: str,
    model: str,
    api_key_env: str | None,
) -> None:
    """Load ``text`` as the config file would be loaded (from a temporary file beside it,
    so that relative paths in it mean the same) and check it assigns what was asked."""
    from .config import load_config
    from .endpoints import Endpoint

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".check")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            config = load_config(Path(tmp))
        except ConfigError as e:
            problem = e.problem.removeprefix(f"{tmp}: ").replace(tmp, str(path))
            raise ConfigError(
                f"{path}: with {role} assigned to {name}, the file would not load: {problem}; "
                "it is unchanged",
                fix=(*e.fixes, Fix("check the endpoint's base_url, model and api_key_env")),
                path=path,
            ) from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    assert config is not None  # a path was given
    wanted = Endpoint.from_description(
        {"base_url": base_url.rstrip("/"), "model": model, "api_key_env": api_key_env}
    )
    roles = config.assign.get("roles")
    if config.endpoints.get(name) != wanted or not (
        isinstance(roles, dict) and roles.get(role) == name
    ):  # pragma: no cover - tomlkit wrote something else than it was asked
        raise ConfigError(
            f"{path}: the edited file does not assign {role} to {name} as asked; it is unchanged",
            fix=Fix(f"add the entry by hand: [endpoints.{name}], assign.roles"),
            path=path,
        )


# -- edits --------------------------------------------------------------------------------


def _set_endpoint(
    doc: TOMLDocument, name: str, base_url: str, model: str, api_key_env: str | None
) -> None:
    import tomlkit
    from tomlkit.items import InlineTable, Table

    values = {"base_url": base_url, "model": model, "api_key_env": api_key_env}
    endpoints = doc.get("endpoints")
    if endpoints is None:
        endpoints = tomlkit.table(is_super_table=True)
        _append_table(doc, "endpoints", endpoints)
    existing = endpoints.get(name)
    if existing is not None and not isinstance(existing, Table | InlineTable):
        del endpoints[name]  # dotted keys (name.model = ...): replaced by a table
        existing = None
    if isinstance(existing, InlineTable):  # name = { ... }: stays inline
        for key in [k for k in existing if k not in ENDPOINT_KEYS]:
            del existing[key]
        for key, value in values.items():
            if value is not None:
                existing[key] = value
            elif key in existing:
                del existing[key]
        return
    if existing is None:
        table = tomlkit.table()
        for key, value in values.items():
            if value is not None:
                table[key] = value
        _insert_table(doc, _segment(endpoints), name, table)
        return
    table = existing
    for key in [k for k in table if k not in ENDPOINT_KEYS]:
        _remove(table, key)
    for key, value in values.items():
        if value is None:
            if key in table:
                del table[key]
        elif key in table:
            table[key] = value  # in place: its position and end-of-line comment stay
        else:
            _insert_value(table, key, value)


def _set_role(path: Path, doc: TOMLDocument, role: str, name: str) -> None:
    import tomlkit
    from tomlkit.items import InlineTable

    assign = doc.get("assign")
    if assign is None:
        assign = tomlkit.table(is_super_table=True)
        roles = tomlkit.table()
        roles[role] = name
        assign["roles"] = roles
        _append_table(doc, "assign", assign)
        return
    roles = assign.get("roles")
    if roles is None:
        if isinstance(assign, InlineTable):
            inline = tomlkit.inline_table()
            inline[role] = name
            assign["roles"] = inline
        else:
            roles = tomlkit.table()
            roles[role] = name
            _insert_table(doc, assign, "roles", roles)
        return
    if isinstance(roles, list):
        raise ConfigError(
            f"{path}: assign.roles is a list (endpoints by speaking position), so which "
            f"entry is {role}'s is not known",
            fix=Fix(
                "write assign.roles as a table keyed by role name "
                '([assign.roles] then NAME = "endpoint"), then assign again'
            ),
            path=path,
        )
    if not isinstance(roles, dict):
        raise ConfigError(
            f"{path}: assign.roles is neither a table nor a list",
            fix=Fix('write it as a table: [assign.roles] then NAME = "endpoint"'),
            path=path,
        )
    if role in roles or isinstance(roles, InlineTable):
        roles[role] = name
    else:
        _insert_value(roles, role, name)


# -- keeping comments above the header they precede ----------------------------------------


def _segment(table: Any) -> Any:
    """The table to add a child to: ``table``, or the last stretch of a table whose
    sub-tables are split across the file (tomlkit's out-of-order proxy)."""
    parts = getattr(table, "_tables", None)
    return parts[-1] if parts else table


def _body(table: Any) -> list[tuple[Any, Item]]:
    """The items of a table or document, in the order they are written."""
    container: Container = table if hasattr(table, "body") else table.value
    return container.body


def _trailer(table: Any) -> list[tuple[Any, Item]]:
    """Cut off and return the comments and blank lines that end the text of ``table``
    (in its last sub-table, when it ends with one): what stands before the next header."""
    from tomlkit.items import AoT, Comment, Null, Table, Whitespace

    body = _body(table)
    if body and body[-1][0] is not None and isinstance(body[-1][1], Table):
        return _trailer(body[-1][1])
    if body and body[-1][0] is not None and isinstance(body[-1][1], AoT):
        tables = body[-1][1].body
        return _trailer(tables[-1]) if tables else []
    cut = len(body)
    while cut > 0 and isinstance(body[cut - 1][1], Whitespace | Comment | Null):
        cut -= 1  # (Null: what tomlkit leaves where it removed an entry)
    trailer = body[cut:]
    del body[cut:]
    return trailer


def _put_back(table: Any, trailer: list[tuple[Any, Item]]) -> None:
    _body(table).extend(trailer)


def _insert_value(table: Table, key: str, value: str) -> None:
    """Add ``key = value`` after the last entry of ``table``, above its trailing comments."""
    trailer = _trailer(table)
    table[key] = value
    _put_back(table, trailer)


def _insert_table(doc: TOMLDocument, parent: Any, key: str, table: Table) -> None:
    """Add sub-table ``key`` after the last entry of ``parent``. The comments that stood
    before the next header move below the new table, so they still precede that header;
    the blank lines before them stay too, to separate the new header. When ``parent``
    ends the file, its last comments precede no header and stay where they are."""
    from tomlkit.items import Null, Whitespace

    keyed = [item for k, item in doc.body if k is not None]
    at_end = bool(keyed) and keyed[-1] is parent
    if at_end:
        parent.append(key, table)  # tomlkit puts a blank line before the header
        return
    trailer = _trailer(parent)
    lead = 0
    while lead < len(trailer) and isinstance(trailer[lead][1], Whitespace | Null):
        lead += 1
    last = _last_table(parent)
    _put_back(last, trailer[:lead])
    parent.append(key, table)
    _put_back(table, trailer)


def _last_table(table: Any) -> Any:
    """The table whose text ends ``table``'s text (itself, or its last sub-table's)."""
    from tomlkit.items import AoT, Table

    body = _body(table)
    if body and body[-1][0] is not None:
        item = body[-1][1]
        if isinstance(item, Table):
            return _last_table(item)
        if isinstance(item, AoT) and item.body:
            return _last_table(item.body[-1])
    return table


def _append_table(doc: TOMLDocument, key: str, table: Table) -> None:
    """Add a top-level table at the end of the file, after a blank line."""
    import tomlkit

    text = doc.as_string()
    if text and not text.endswith("\n"):
        doc.add(tomlkit.nl())
    if text.strip() and not text.endswith("\n\n"):
        doc.add(tomlkit.nl())
    doc.append(key, table)


def _remove(table: Table, key: str) -> None:
    """Remove ``key`` from ``table``; when it is a sub-table, the comments before the next
    header, which end its text, are kept at the end of ``table``."""
    from tomlkit.items import AoT, Null, Table, Whitespace

    item = table[key]
    if not isinstance(item, Table | AoT):
        del table[key]
        return
    trailer = _trailer(item)
    del table[key]
    last = _body(_last_table(table))
    while last and isinstance(last[-1][1], Whitespace | Null):
        last.pop()  # the blank lines before the removed header: the trailer has its own
    last.extend(trailer)
