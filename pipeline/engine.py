"""The embedded engine's own process: llama.cpp's HTTP server, run in-process by ``xllamacpp``.

:class:`pipeline.local.LocalServer` starts this module as a child process
(``python -m pipeline.engine --model PATH --port N ...``). It loads the GGUF, serves the
OpenAI API (``/v1/models``, ``/v1/chat/completions``) and llama.cpp's ``/props`` on
``127.0.0.1:N``, and runs until it is sent SIGTERM or SIGINT, or its parent dies.

The chat template is the GGUF's own (``tokenizer.chat_template``), and ``--ctx 0`` asks
llama.cpp for the model's training context. ``--parallel N`` gives the server N slots,
each holding a conversation, in one KV cache of ``--ctx`` tokens; llama.cpp gives each
request the slot whose cached prompt shares the longest prefix with it
(``slot_prompt_similarity``), so each role's growing conversation keeps its slot and only
its newest message is read. Requests on different slots are decoded together
(continuous batching).

Server options: https://github.com/ggml-org/llama.cpp/tree/master/tools/server
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.engine")
    parser.add_argument("--model", required=True, help="path of the GGUF file")
    parser.add_argument("--alias", required=True, help="the model name the API reports")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=1, help="slots (conversations)")
    parser.add_argument(
        "--ctx", type=int, default=0, help="KV cache tokens, shared by the slots; 0: the GGUF's"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; return the exit code (0)."""
    args = _arguments(argv)
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    # One KV cache shared by every slot (memory does not grow with the slots); when it is
    # full, llama.cpp moves idle slots' prompts to its RAM cache and back.
    params.kv_unified = True
    params.n_ctx = args.ctx
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.endpoint_props = True
    params.ui = False
    params.warmup = False
    if not args.verbose:
        params.verbosity = 0

    server = xllamacpp.Server(params)  # loads the model, then listens
    # llama.cpp's server installs its own SIGINT and SIGTERM handlers; ours replace them.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sys.stderr.write(f"engine listening on {server.listening_address}\n")
    sys.stderr.flush()
    stop.wait()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # the server's threads are not joined: nothing on them is worth a wait
