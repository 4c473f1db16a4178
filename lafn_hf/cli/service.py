"""``lafn serve`` and ``lafn models``: the OpenAI-compatible server and the offline real models."""

from __future__ import annotations

import argparse


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import materialize

    print(materialize(args.name))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import serve  # needs the serve extra (fastapi, uvicorn, openai)
    from ..serve.requests import RequestLimits

    limits = RequestLimits() if args.max_new_tokens is None else RequestLimits(max_new_tokens=args.max_new_tokens)
    return serve(args.model, args.bank or [], host=args.host, port=args.port, dtype=args.dtype, device=args.device,
                 continuous_batching=args.continuous_batching, chat_template=args.chat_template,
                 admin=not args.no_admin, admin_token=args.admin_token, admin_token_file=args.admin_token_file,
                 allowed_hosts=args.allowed_host or [], limits=limits,
                 log_level="info" if args.verbose else "warning")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The subcommands of this module, on ``lafn``'s parser."""
    models = sub.add_parser("models", help="materialize an offline real model (gemma-3-270m, smollm2-135m)")
    models.add_argument("name", help="gemma-3-270m or smollm2-135m")
    models.set_defaults(run=cmd_models)
    serve = sub.add_parser("serve", help="serve the model and banks on an OpenAI-compatible API (transformers serve)")
    serve.add_argument("--model", required=True, help="path, Hub id, tiny-bilingual or an offline model; the model "
                       "name that gets every bank")
    serve.add_argument("--bank", action="append", help="DIR or NAME=DIR (repeatable); served as MODEL+NAME")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    serve.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    serve.add_argument("--continuous-batching", action="store_true",
                       help="transformers' continuous batching: concurrent requests packed into one forward, "
                            "each read and edited with its own banks")
    serve.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's)")
    serve.add_argument("--admin-token", help="the token /lafn/banks requires ('Authorization: Bearer TOKEN'; default: "
                       "$LAFN_ADMIN_TOKEN, else a new one, printed and written to --admin-token-file)")
    serve.add_argument("--admin-token-file", help="where a new admin token is written, mode 0600 (default: "
                       "$XDG_RUNTIME_DIR or ~/.cache, lafn_hf/serve-PORT.token)")
    serve.add_argument("--no-admin", action="store_true", help="no /lafn/banks routes: the banks are fixed at start")
    serve.add_argument("--allowed-host", action="append", help="another name the Host header of admin calls may give "
                       "(repeatable; default: the address served)")
    serve.add_argument("--max-new-tokens", type=int, help="most tokens one request may generate; a request asking "
                       "for more is refused (default: 4096, RequestLimits in lafn_hf/serve/requests.py)")
    serve.set_defaults(run=cmd_serve)
