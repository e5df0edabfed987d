"""A small stdio MCP server the tests start (through the pipeline's config), built on the
official SDK's ``MCPServer``. Every call it receives is appended to the file named by
``MCP_CALL_LOG`` (when set), so that a test can tell whether it ran.

Run: ``python tests/mcpserver.py`` (speaks JSON-RPC on stdin and stdout).
"""

from __future__ import annotations

import json
import os
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

app = MCPServer("pipeline-test-tools")


def logged(name: str, **arguments: object) -> None:
    if path := os.environ.get("MCP_CALL_LOG"):
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"tool": name, "arguments": arguments}) + "\n")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    logged("add", a=a, b=b)
    return a + b


@app.tool()
def define(term: str) -> str:
    """Look a term up in a small glossary."""
    logged("define", term=term)
    glossary = {"fairness": "treating like cases alike"}
    if term not in glossary:
        raise ToolError(f"no entry for {term!r}")
    return glossary[term]


@app.tool()
def slow(seconds: float) -> str:
    """Wait, then answer (for time-outs)."""
    logged("slow", seconds=seconds)
    time.sleep(seconds)
    return "finally"


@app.tool()
def secret() -> str:
    """A tool no config allows."""
    logged("secret")
    return "you should not see this"


if __name__ == "__main__":
    app.run()
