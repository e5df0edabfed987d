"""Writing a role's model into pipeline.toml: exact text kept, backups, refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.configwrite import assign_role_model, backup_path
from pipeline.endpoints import Endpoint
from pipeline.errors import ConfigError

SAMPLE = """\
# Endpoints for the cycle.   (a comment before everything)
[endpoints.local]   # the laptop
base_url = "http://127.0.0.1:8080/v1"
model = "qwen"  # small one

[endpoints.tuned-ana]
model = "old-model"   # the first tuned one
base_url = "http://old.example/v1"
structured_output = "prompt"

# Who does what: this comment belongs above [assign].
[assign]
default = "local"

[assign.roles]
Ana = "tuned-ana"   # the persona
Bob = "local"

# tools, last
[mcp.servers.search]
command = "search-server"
"""

ADDED = """\
# Endpoints for the cycle.   (a comment before everything)
[endpoints.local]   # the laptop
base_url = "http://127.0.0.1:8080/v1"
model = "qwen"  # small one

[endpoints.tuned-ana]
model = "old-model"   # the first tuned one
base_url = "http://old.example/v1"
structured_output = "prompt"

[endpoints.tuned-cy]
base_url = "https://api.example/v1"
model = "ft:base:cy:1"
api_key_env = "OPENAI_API_KEY"

# Who does what: this comment belongs above [assign].
[assign]
default = "local"

[assign.roles]
Ana = "tuned-ana"   # the persona
Bob = "local"
Cy = "tuned-cy"

# tools, last
[mcp.servers.search]
command = "search-server"
"""

REPLACED = """\
# Endpoints for the cycle.   (a comment before everything)
[endpoints.local]   # the laptop
base_url = "http://127.0.0.1:8080/v1"
model = "qwen"  # small one

[endpoints.tuned-ana]
model = "ft:base:ana:2"   # the first tuned one
base_url = "https://api.example/v1"

# Who does what: this comment belongs above [assign].
[assign]
default = "local"

[assign.roles]
Ana = "tuned-ana"   # the persona
Bob = "local"

# tools, last
[mcp.servers.search]
command = "search-server"
"""

NO_ASSIGN = """\
[endpoints.local]
base_url = "http://127.0.0.1:8080/v1"
model = "qwen"
# a last comment, before no header
"""

NO_ASSIGN_AFTER = """\
[endpoints.local]
base_url = "http://127.0.0.1:8080/v1"
model = "qwen"
# a last comment, before no header

[endpoints.tuned-cy]
base_url = "https://api.example/v1"
model = "ft:base:cy:1"
api_key_env = "OPENAI_API_KEY"

[assign.roles]
Cy = "tuned-cy"
"""

NO_ROLES = """\
[endpoints.local]
base_url = "http://127.0.0.1:8080/v1"
model = "qwen"

[assign]
judge = "local"  # the judge stays local

# tools
[mcp.servers.search]
command = "search-server"
"""

NO_ROLES_AFTER = """\
[endpoints.local]
base_url = "http://127.0.0.1:8080/v1"
model = "qwen"

[endpoints.tuned-cy]
base_url = "https://api.example/v1"
model = "ft:base:cy:1"
api_key_env = "OPENAI_API_KEY"

[assign]
judge = "local"  # the judge stays local

[assign.roles]
Cy = "tuned-cy"

# tools
[mcp.servers.search]
command = "search-server"
"""

WITH_PARAMS = """\
[endpoints.tuned-cy]
base_url = "http://old.example/v1"
model = "old"

[endpoints.tuned-cy.params]
seed = 1

# roles
[assign.roles]
Cy = "tuned-cy"
"""

WITH_PARAMS_AFTER = """\
[endpoints.tuned-cy]
base_url = "https://api.example/v1"
model = "ft:base:cy:1"
api_key_env = "OPENAI_API_KEY"

# roles
[assign.roles]
Cy = "tuned-cy"
"""

INLINE = """\
[endpoints]
local = { base_url = "http://127.0.0.1:8080/v1", model = "qwen" }

[assign]
roles = { Bob = "local" }  # inline
"""

INLINE_AFTER = """\
[endpoints]
local = { base_url = "http://127.0.0.1:8080/v1", model = "qwen" }

[endpoints.tuned-cy]
base_url = "https://api.example/v1"
model = "ft:base:cy:1"
api_key_env = "OPENAI_API_KEY"

[assign]
roles = { Bob = "local", Cy = "tuned-cy"}  # inline
"""

CY = {
    "role": "Cy",
    "endpoint_name": "tuned-cy",
    "base_url": "https://api.example/v1",
    "model": "ft:base:cy:1",
    "api_key_env": "OPENAI_API_KEY",
}
ANA = {**CY, "role": "Ana", "endpoint_name": "tuned-ana", "model": "ft:base:ana:2"}


def write(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


@pytest.mark.parametrize(
    ("before", "args", "after"),
    [
        pytest.param(SAMPLE, CY, ADDED, id="a new endpoint and role, comments kept above"),
        pytest.param(
            SAMPLE, {**ANA, "api_key_env": None}, REPLACED, id="an existing endpoint replaced"
        ),
        pytest.param(NO_ASSIGN, CY, NO_ASSIGN_AFTER, id="[assign.roles] made at the end"),
        pytest.param(NO_ROLES, CY, NO_ROLES_AFTER, id="[assign.roles] made inside [assign]"),
        pytest.param(WITH_PARAMS, CY, WITH_PARAMS_AFTER, id="the old endpoint's params dropped"),
        pytest.param(INLINE, CY, INLINE_AFTER, id="inline tables stay inline"),
        pytest.param(
            "", CY, NO_ASSIGN_AFTER.split("\n\n", 1)[1], id="an empty file gets both tables"
        ),
    ],
)
def test_the_file_is_kept_but_for_the_assignment(tmp_path, before, args, after):
    path = write(tmp_path, before)
    backup = assign_role_model(path, **args)
    assert path.read_text() == after
    assert backup == path.with_name("pipeline.toml.bak") == backup_path(path)
    assert backup.read_text() == before
    config = load_config(path)
    assert config is not None
    assert config.endpoints[args["endpoint_name"]] == Endpoint(
        args["base_url"], args["model"], args["api_key_env"]
    )
    assert config.name_for_role(5, args["role"]) == args["endpoint_name"]


def test_assigning_twice_changes_nothing_more_and_the_backup_is_the_last_file(tmp_path):
    path = write(tmp_path, SAMPLE)
    assign_role_model(path, **CY)
    assign_role_model(path, **CY)
    assert path.read_text() == ADDED
    assert backup_path(path).read_text() == ADDED  # the older backup (SAMPLE) is replaced


def test_crlf_lines_and_the_file_mode_are_kept(tmp_path):
    path = write(tmp_path, NO_ROLES.replace("\n", "\r\n"))
    path.chmod(0o640)
    backup = assign_role_model(path, **CY)
    assert path.read_bytes() == NO_ROLES_AFTER.replace("\n", "\r\n").encode()
    assert backup.read_bytes() == NO_ROLES.replace("\n", "\r\n").encode()
    assert (path.stat().st_mode & 0o777, backup.stat().st_mode & 0o777) == (0o640, 0o640)


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        pytest.param(
            '[endpoints.a]\nbase_url = "http://a/v1"\nmodel = "a"\n[assign]\nroles = ["a"]\n',
            CY,
            "assign.roles is a list (endpoints by speaking position), so which entry is "
            "Cy's is not known; write assign.roles as a table keyed by role name",
            id="roles by position",
        ),
        pytest.param(
            SAMPLE,
            {**CY, "endpoint_name": "local"},
            "endpoints.local is also used by assign.default, assign.roles.Bob; changing its "
            "model would change theirs; choose another endpoint name",
            id="an endpoint others use",
        ),
        pytest.param(
            SAMPLE,
            {**CY, "base_url": "ftp://api.example"},
            "with Cy assigned to tuned-cy, the file would not load: endpoints.tuned-cy."
            "base_url: 'ftp://api.example' does not match '^https?://'; it is unchanged",
            id="a result that would not load",
        ),
        pytest.param(
            "[endpoints.a]\nmodel = 1\n",
            CY,
            "endpoints.a.model: 1 is not of type 'string'; it does not load as it is, so no "
            "model was assigned; fix the file first",
            id="a file that does not load",
        ),
        pytest.param("[endpoints\n", CY, "not valid TOML", id="not TOML"),
    ],
)
def test_refusals_leave_the_file_untouched(tmp_path, text, args, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        assign_role_model(path, **args)
    assert message in caught.value.message
    assert caught.value.fixes
    assert path.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.toml"]  # no backup, no temp


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        assign_role_model(tmp_path / "pipeline.toml", **CY)
    assert caught.value.problem == f"{tmp_path / 'pipeline.toml'}: no such config file"
    assert caught.value.fixes[0].options == ("config",)
    assert list(tmp_path.iterdir()) == []


def test_without_tomlkit_the_fix_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomlkit", None)  # import tomlkit raises ImportError
    path = write(tmp_path, SAMPLE)
    with pytest.raises(ConfigError) as caught:
        assign_role_model(path, **CY)
    assert caught.value.fixes[0].text == "pip install 'converse-pipeline[cycle]'"
    assert path.read_text() == SAMPLE
