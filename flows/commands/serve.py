"""`circuitflow serve`: the store's results over HTTP, read-only (storage.web): runs, dashboards,
every feature's page and every trace graph. Binds to 127.0.0.1 unless --host says otherwise."""

from __future__ import annotations

import argparse

from storage.links import DEFAULT_PORT, SERVE_URL_ENV


def main(args: argparse.Namespace) -> int:
    from storage.web import StoreSite, make_server

    site = StoreSite(args.store)  # a store that does not exist stops here
    server = make_server(site, args.host, args.port)  # so does an address in use
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    print(f"serving {site.root} at {url}/ (read-only; Ctrl-C stops)", flush=True)
    print(f"for links from Prefect artifacts, run flows with {SERVE_URL_ENV}={url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`circuitflow serve [--store DIR] [--host 127.0.0.1] [--port P]`."""
    serve = sub.add_parser("serve", help="serve the store's dashboards, feature pages, trace graphs and runs over HTTP")
    serve.add_argument("--store", default="./store", help="store root (default ./store)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
