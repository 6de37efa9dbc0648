"""``python -m ml_backend --run runs/a --port 9090``: the backend for local use (gunicorn in Docker)."""

from __future__ import annotations

import argparse
import os
import sys

from ml_backend._wsgi import configure_logging, create_app
from ml_backend.model import SlimAttentionBackend
from pipeline.core.errors import PipelineError


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_backend", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, metavar="DIR", help="run directory to serve")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; 0.0.0.0 in Docker)")
    parser.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    parser.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"),
                        help="Label Studio URL, to fetch images of unseen tasks (default $LABEL_STUDIO_URL)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level of the JSON-lines log on stderr (default INFO)")
    args = parser.parse_args()
    configure_logging(args.log_level)
    try:
        backend = SlimAttentionBackend(args.run, args.url, os.environ.get("LABEL_STUDIO_API_KEY")).setup()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    app = create_app(backend, (user, password) if user and password else None)
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
