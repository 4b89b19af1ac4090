"""The ``fastprof`` command line.

::

    fastprof token --secret-env FASTPROF_SECRET --ttl 300 [--route /items/{item_id}] [--method GET]
    fastprof viewer-token --secret-env FASTPROF_SECRET
    fastprof profile get <id> --url https://host/_fastprof/profiles [--format html] [-o file]
    fastprof run [--host H --port P --workers N --reload ...] main:app

Secrets are read from environment variables, never from arguments (which end up
in shell history and process listings).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

__all__ = ["main"]

_MAX_DOWNLOAD = 512 * 1024 * 1024


def _secret_from_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"fastprof: environment variable {name} is not set")
    return value


def _cmd_token(args: argparse.Namespace) -> int:
    from fastprof.profiling import mint_token

    try:
        token = mint_token(
            _secret_from_env(args.secret_env), ttl_s=args.ttl, route=args.route, method=args.method
        )
    except ValueError as exc:
        print(f"fastprof: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _cmd_viewer_token(args: argparse.Namespace) -> int:
    from fastprof.profiling import viewer_token

    try:
        print(viewer_token(_secret_from_env(args.secret_env)))
    except ValueError as exc:
        print(f"fastprof: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_profile_get(args: argparse.Namespace) -> int:
    from fastprof.profiling import viewer_token
    from fastprof.profiling.stores import valid_profile_id

    if not valid_profile_id(args.id):
        print("fastprof: a profile id is 32 lowercase hex characters", file=sys.stderr)
        return 2
    if not args.url.startswith(("http://", "https://")):
        print("fastprof: --url must be an http(s) URL", file=sys.stderr)
        return 2
    if args.viewer_token_env:
        bearer = _secret_from_env(args.viewer_token_env)
    else:
        bearer = viewer_token(_secret_from_env(args.secret_env))
    url = f"{args.url.rstrip('/')}/{args.id}?format={args.format}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {bearer}"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            body = response.read(_MAX_DOWNLOAD + 1)
    except urllib.error.HTTPError as exc:
        print(f"fastprof: {url}: HTTP {exc.code} (unknown id or not authorised)", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"fastprof: {url}: {exc}", file=sys.stderr)
        return 1
    if len(body) > _MAX_DOWNLOAD:
        print("fastprof: profile too large", file=sys.stderr)
        return 1
    if args.output in (None, "-"):
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
    else:
        with open(args.output, "wb") as f:
            f.write(body)
        print(f"wrote {args.output} ({len(body)} bytes)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprof", description="fastprof command line")
    sub = parser.add_subparsers(dest="command", required=True)

    token = sub.add_parser("token", help="mint a single-use profile token")
    token.add_argument("--secret-env", default="FASTPROF_SECRET", help="variable holding it")
    token.add_argument("--ttl", type=float, default=300.0, help="lifetime in seconds (default 300)")
    token.add_argument("--route", help="only valid for this route template, e.g. /items/{item_id}")
    token.add_argument("--method", help="only valid for this HTTP method")
    token.set_defaults(func=_cmd_token)

    vtoken = sub.add_parser("viewer-token", help="print the viewer's default bearer token")
    vtoken.add_argument("--secret-env", default="FASTPROF_SECRET")
    vtoken.set_defaults(func=_cmd_viewer_token)

    profile = sub.add_parser("profile", help="work with stored profiles")
    profile_sub = profile.add_subparsers(dest="profile_command", required=True)
    get = profile_sub.add_parser("get", help="download a stored profile from the viewer")
    get.add_argument("id", help="profile id (32 hex characters)")
    get.add_argument("--url", required=True, help="base URL of the mounted viewer")
    get.add_argument("--format", choices=("html", "speedscope", "json"), default="html")
    get.add_argument("-o", "--output", help="output file (default: stdout)")
    get.add_argument("--secret-env", default="FASTPROF_SECRET", help="derive the viewer token")
    get.add_argument("--viewer-token-env", help="variable holding the viewer bearer token instead")
    get.add_argument("--timeout", type=float, default=30.0)
    get.set_defaults(func=_cmd_profile_get)

    from fastprof._runner import add_parser as add_run_parser

    add_run_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
