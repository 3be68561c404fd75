"""`kiqa serve-dev`: a local development gRPC server speaking TF Serving's API. Not TF Serving.

For trying `kiqa predict` and the export on a machine without `tensorflow_model_server`.
It binds 127.0.0.1 only. See `kiqa.serving.devserver` for what it does and does not imitate.
"""

import argparse
import sys

from kiqa.cli._common import EXIT_OK, entry_point
from kiqa.contract import MAX_REQUEST_BYTES

# kiqa.contract.MAX_REQUEST_BYTES in MiB (the contract is TF-free, so --help stays fast).
MAX_MESSAGE_MB = MAX_REQUEST_BYTES // 2**20


def build_parser(prog=None):
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog or "kiqa serve-dev",
        description="Serve exported kiqa versions over TF Serving's gRPC API (Predict, "
        "GetModelMetadata, GetModelStatus) on 127.0.0.1, for development and tests. This is "
        "NOT TF Serving: no batching, no REST, no GPU placement, no monitoring. Deploy with "
        "TF Serving (serving/README.md).",
    )
    parser.add_argument("--base", default="export/kiqa",
                        help="model base path holding integer version folders (default export/kiqa)")
    parser.add_argument("--port", type=int, default=8500,
                        help="port on 127.0.0.1 (default 8500, TF Serving's gRPC port; 0 picks a free one)")
    parser.add_argument("--model-name", default=None,
                        help="name clients ask for (default: the base path's last folder)")
    parser.add_argument("--versions", default="latest",
                        help="latest (TF Serving's default), all, or a comma-separated list of versions")
    parser.add_argument("--poll", type=float, default=1.0,
                        help="seconds between scans of --base for new versions (default 1, as TF Serving; 0 = never)")
    parser.add_argument("--max-message-mb", type=float, default=MAX_MESSAGE_MB,
                        help=f"largest request accepted, in MiB (default {MAX_MESSAGE_MB}: a full batch of "
                        "32 images; TF Serving allows 2048)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip replaying assets.extra/tf_serving_warmup_requests at load")
    return parser


def _versions(text):
    if text in ("latest", "all"):
        return text
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        from kiqa.errors import ConfigError

        raise ConfigError(f"--versions must be latest, all or numbers like 1,3; got {text!r}") from None


@entry_point
def main(argv=None, prog=None):
    """Runs `kiqa serve-dev` until interrupted."""
    args = build_parser(prog).parse_args(argv)
    from kiqa.serving.devserver import DevServer

    server = DevServer(
        args.base, model_name=args.model_name, port=args.port,
        versions=_versions(args.versions), warmup=not args.no_warmup,
        max_message_bytes=int(args.max_message_mb * 2**20),
    )
    server.start(poll_seconds=args.poll or None)
    try:
        available = server.available_versions()
        print(
            f"kiqa dev server (a development stand-in, NOT TF Serving) serving model "
            f"{server.model_name!r} versions {available or 'none yet'} from {args.base} on "
            f"{server.address}; Ctrl-C to stop",
            flush=True,
        )
        server.wait()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.stop(grace=1)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
