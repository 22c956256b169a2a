"""The `edge-agent` command line: the parser and the dispatch; each command lives in its own module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import __version__
from agent.config import config_path, load_config
from agent.errors import ConfigError

CONFIG_HELP = "config file (default: $EDGE_AGENT_CONFIG, else /etc/edge-agent/agent.toml)"
DESCRIPTION = """\
Shop-floor edge daemon: reads equipment (OPC UA, Modbus, serial printers, file drops), publishes to MQTT,
talks to MPM, serves a local HTTP API. The reference is in docs/ of the source tree
(docs/configuration.md, docs/mqtt.md, docs/operations.md, docs/troubleshooting.md).

Commissioning a new machine, in order:
  edge-agent config sample --driver modbus > agent.toml   a commented starting point
  edge-agent browse opcua opc.tcp://HOST:4840 --toml      find OPC UA tags
  edge-agent scan modbus HOST:502 --range 0-99 --toml     find Modbus registers
  edge-agent check-config --config agent.toml             validate
  edge-agent test --config agent.toml                     read every tag once, publish nothing
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, help_text in (
        ("run", "run the daemon in the foreground (SIGHUP reloads the config, SIGTERM stops)"),
        (
            "simulate",
            "start the built-in simulators the config's equipment and [mpm] point at; exits 1 when one "
            "cannot start (a port in use)",
        ),
    ):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--config", help=CONFIG_HELP)
    cc = sub.add_parser(
        "check-config",
        help="validate the configuration: one line per problem, exit 2 when invalid",
        description="Validate the configuration: one line per problem with its line number; exit 2 when invalid. "
        "Secret files are read, so run it where the service's credentials are, or give --credentials.",
    )
    cc.add_argument("--config", help=CONFIG_HELP)
    cc.add_argument(
        "--credentials",
        metavar="DIR",
        help="read secrets named /run/credentials/edge-agent.service/NAME from DIR/NAME instead, as the service "
        "will see them (install.sh keeps them in /etc/edge-agent/credentials)",
    )
    sp = sub.add_parser(
        "service-paths",
        help="folders the service writes, one a line (install.sh turns them into ReadWritePaths=)",
        description="Print the folders the daemon writes besides /var/lib/edge-agent (a file drop's folders, "
        "a state_dir elsewhere), one a line. The config is read without its secrets.",
    )
    sp.add_argument("--config", help=CONFIG_HELP)
    st = sub.add_parser(
        "status",
        help="equipment table from a running daemon's HTTP API",
        description="Equipment table from a running daemon's HTTP API. Without --url the address is [http] listen "
        "of the config (read without its secrets); when that cannot be read it says why and tries "
        "127.0.0.1:8710.",
    )
    st.add_argument("--url", default=None, help="API base URL, e.g. http://127.0.0.1:8710")
    st.add_argument("--key-file", default=None, help="file holding an API key (or $EDGE_AGENT_API_KEY)")
    st.add_argument("--config", help="read [http] listen from this config when --url is not given")
    st.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) with active alerts and bad tags, until Ctrl-C",
    )
    sub.add_parser("version", help="print the version")
    comp = sub.add_parser(
        "completion",
        help="print a shell completion script (bash)",
        description="Print a bash completion script: `edge-agent completion > /etc/bash_completion.d/edge-agent`.",
    )
    comp.add_argument("shell", nargs="?", default="bash", choices=["bash"])
    from agent.cli_commission import add_commission_parsers

    add_commission_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "version":
        print(f"edge-agent {__version__}")
        return 0
    if args.cmd == "check-config":
        return check_config(config_path(args.config), args.credentials)
    if args.cmd == "run":
        from agent.daemon import run_daemon

        return run_daemon(config_path(args.config))
    if args.cmd == "simulate":
        from agent.simulate import run_simulators

        return run_simulators(config_path(args.config))
    if args.cmd == "status":
        from agent.cli_status import status

        return status(args.url, args.key_file, args.config, args.watch)
    if args.cmd == "service-paths":
        return service_paths(config_path(args.config))
    if args.cmd == "completion":
        print(bash_completion(parser))
        return 0
    from agent.cli_commission import run_commission

    return run_commission(args)


def check_config(path: Path, credentials: str | None = None) -> int:
    """Print one line per problem; 0 when valid, 2 when not."""
    try:
        if credentials is None:
            cfg = load_config(path)
        else:
            from agent.cli_status import load_with_credentials

            cfg = load_with_credentials(path, Path(credentials))
    except ConfigError as err:
        for line in err.problems:
            print(line)
        return 2
    print(f"{path}: valid ({len(cfg.equipment)} equipment)")
    return 0


def service_paths(path: Path) -> int:
    """Print the folders the service must be able to write; 2 when the config is invalid."""
    from agent.cli_status import read_without_secrets
    from agent.commission.service import writable_paths

    try:
        cfg = read_without_secrets(path)
    except ConfigError as err:
        print("\n".join(err.problems), file=sys.stderr)
        return 2
    for folder in writable_paths(cfg):
        print(folder)
    return 0


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for the commands and their options, built from the parser."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, sp in subs.choices.items():
        opts = " ".join(o for a in sp._actions for o in a.option_strings)
        cases.append(f'    {name}) opts="{opts}" ;;')
    words = " ".join(subs.choices)
    return "\n".join(
        [
            "# bash completion for edge-agent",
            "_edge_agent() {",
            "  local cur=${COMP_WORDS[COMP_CWORD]} opts",
            '  if [ "$COMP_CWORD" -eq 1 ]; then',
            f'    COMPREPLY=($(compgen -W "{words} --help --version" -- "$cur")); return',
            "  fi",
            '  case "${COMP_WORDS[1]}" in',
            *cases,
            "    *) opts='' ;;",
            "  esac",
            '  case "$cur" in -*) COMPREPLY=($(compgen -W "$opts --help" -- "$cur")) ;; '
            '*) COMPREPLY=($(compgen -f -- "$cur")) ;; esac',
            "}",
            "complete -F _edge_agent edge-agent",
        ]
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
