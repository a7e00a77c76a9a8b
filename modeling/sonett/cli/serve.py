"""Serve a Sonett model folder over an OpenAI-compatible API (transformers' own server, `transformers serve`).

    python scripts/serve.py runs/sonett-tiny                # http://127.0.0.1:8000/v1
    python scripts/serve.py runs/sonett-tiny --port 8080 --device cpu

Routes: POST /v1/chat/completions (plain and streamed), POST /v1/completions, POST /v1/responses, GET /v1/models,
GET /health. The model name in requests is the folder exactly as given here. Plain `transformers serve
--trust-remote-code FOLDER` cannot load remote-code models (see `sonett.inference.serving`); this command reuses its
server and loads the model through the Auto classes instead. It listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sonett.inference.serving import DEFAULT_HOST, DEFAULT_PORT, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a Sonett model folder or Hub id (`org/name@revision` pins a commit)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0, ...")
    parser.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16, float16")
    parser.add_argument("--attn_implementation", default=None, help="eager, sdpa, ...")
    parser.add_argument("--enable_cors", action="store_true", help="allow requests from any web origin")
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(
        args.folder,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        enable_cors=args.enable_cors,
    )


if __name__ == "__main__":
    sys.exit(main())
