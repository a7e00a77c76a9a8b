"""Serve a Sonett model folder over an OpenAI-compatible API (transformers' own server, `transformers serve`).

    sonett serve runs/sonett-tiny                # http://127.0.0.1:8000/v1
    sonett serve runs/sonett-tiny --port 8080 --device cpu

Routes: POST /v1/chat/completions (plain and streamed), POST /v1/completions, POST /v1/responses, GET /v1/models,
GET /health. The model name in requests is the folder exactly as given here. Plain `transformers serve
--trust-remote-code FOLDER` cannot load remote-code models (see `sonett.inference.serving`); this command reuses its
server and loads the model through the Auto classes instead. It listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sonett.cli.parsing import argument_parser, spellings
from sonett.inference.serving import DEFAULT_HOST, DEFAULT_PORT, serve


def build_parser() -> argparse.ArgumentParser:
    """The parser of `sonett serve`."""
    parser = argument_parser("serve", __doc__)
    parser.add_argument("folder", help="a Sonett model folder or Hub id (`org/name@revision` pins a commit)")
    parser.add_argument(
        *spellings("host"), default=DEFAULT_HOST, help="address to listen on (0.0.0.0 exposes the server)"
    )
    parser.add_argument(*spellings("port"), type=int, default=DEFAULT_PORT, help="TCP port to listen on")
    parser.add_argument(*spellings("device"), default="auto", help="auto, cpu, cuda, cuda:0, ...")
    parser.add_argument(*spellings("dtype"), default="auto", help="auto (as saved), float32, bfloat16, float16")
    parser.add_argument(
        *spellings("attn_implementation"), default=None, help="eager, sdpa, ... (default: the model's choice)"
    )
    parser.add_argument(*spellings("enable_cors"), action="store_true", help="allow requests from any web origin")
    parser.add_argument(
        *spellings("log_level"), default="info", help="debug, info, warning or error (the server's and sonett's)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
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
    except OSError as error:  # transformers' "Repo id must be ..." / "couldn't connect" for a mistyped folder
        if Path(args.folder.split("@")[0]).expanduser().exists():
            raise
        parser.error(
            f"{args.folder} is neither a model folder nor a Hub repository that could be loaded ({error}). Pass a "
            "folder written by `sonett train` (e.g. runs/sonett-tiny) or a Hub id."
        )


if __name__ == "__main__":
    sys.exit(main())
