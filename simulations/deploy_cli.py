"""``fedgen prepare``, ``fedgen certs`` and ``fedgen superlink``: the operator's commands for a deployed
federation (real SuperLink and SuperNodes; see docs/deploy.md).

``simulations/cli.py`` registers them with one call: ``add_deploy_parsers(sub)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import write_deployment_run_dir
    from fedgen.contract.scenario import load_scenario

    scenario = load_scenario(args.scenario, args.set)
    run_dir = write_deployment_run_dir(scenario, Path(args.out))
    ref = "with" if scenario.deployment and scenario.deployment.reference else "without"
    print(f"prepared {run_dir} ({ref} a public reference set); start the run with\n"
          f"  flwr run <app-dir> <connection> --run-config 'run-dir=\"{run_dir}\"' --stream")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from .certs import write_federation_keys, write_site_key

    out = Path(args.out_dir)
    if args.rotate_site is not None:
        if not (out / "ca.crt").exists():
            raise FileNotFoundError(f"{out}: no ca.crt here; create the federation's keys first "
                                    "(`fedgen certs OUT_DIR --sites N`)")
        private, public = write_site_key(out, args.rotate_site)
        print(f"new key pair for site {args.rotate_site}: {private} (0600, give to the site) and {public}\n"
              f"register the new key:   flwr supernode register {public} <connection>\n"
              "then unregister the old node: flwr supernode list <connection>; "
              "flwr supernode unregister NODE_ID <connection>")
        return 0
    keys = write_federation_keys(out, sites=args.sites, hosts=args.superlink_host or ["127.0.0.1", "localhost"])
    print(f"CA:        {keys.ca_cert} (give to every site and to `flwr`), {keys.ca_key} (0600, keep offline)")
    print(f"SuperLink: {keys.server_cert}, {keys.server_key} (0600)")
    for site, private in keys.site_private_keys.items():
        print(f"site {site}:    {private} (0600, only for that site), {keys.site_public_keys[site]} "
              "(register with `flwr supernode register`)")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    from .superlink import serve

    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    serve(flower_args, control_address=args.control_address, home=args.home)
    return 0


def add_deploy_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prepare``, ``certs`` and ``superlink`` on the ``fedgen`` sub-command parser."""
    p = subparsers.add_parser(
        "prepare", help="create the run directory of a deployed federation (no data at the server)",
        description="Write RUN_DIR (scenario.yaml, inputs/site_data.json, optional public reference) from "
                    "SCENARIO.yaml's `deployment:` section, for `flwr run` against a real SuperLink.")
    p.add_argument("scenario", help="scenario YAML file with a `deployment:` section")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create (must not exist)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario value (repeatable)")
    p.set_defaults(func=cmd_prepare)

    p = subparsers.add_parser(
        "certs", help="create a CA, the SuperLink TLS certificate and per-site SuperNode auth keys",
        description="Create OUT_DIR/ca.crt+ca.key, superlink.crt+superlink.key (SANs for every "
                    "--superlink-host) and OUT_DIR/sites/<i>/auth.key+auth.pub (ECDSA P-384, OpenSSH format, "
                    "as flower-supernode --auth-supernode-private-key and flwr supernode register expect). "
                    "Private keys are written 0600.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--sites", type=_positive_int, default=1, help="number of site key pairs (named 0..N-1)")
    p.add_argument("--superlink-host", action="append", default=[], metavar="HOST",
                   help="an IP address or DNS name the SuperLink is reached at (repeatable; 127.0.0.1 "
                        "and localhost are always added, for the loopback Control API)")
    p.add_argument("--rotate-site", metavar="SITE", help="only (re)create SITE's key pair, keep the CA")
    p.set_defaults(func=cmd_certs)

    p = subparsers.add_parser(
        "superlink", help="flower-superlink with the Control API on loopback, apart from the public Fleet API",
        description="Run flwr 1.42's SuperLink with its Fleet API on flower-superlink's --host/--port (public: "
                    "SuperNodes only) and its Control and Runtime APIs on --control-address only (loopback: the "
                    "operator's `flwr`). Arguments after `--` go to flower-superlink unchanged.",
        usage="fedgen superlink [--control-address HOST:PORT] [--home DIR] -- FLOWER_SUPERLINK_ARGS...")
    p.add_argument("--control-address", default="127.0.0.1:9091", metavar="HOST:PORT",
                   help="where the Control API (and the SuperExec's Runtime API) listens (default 127.0.0.1:9091)")
    p.add_argument("--home", metavar="DIR",
                   help="Flower's home folder for the SuperLink and the ServerApps it starts (FLWR_HOME; "
                        "matplotlib's cache goes under it too); default: $FLWR_HOME if set, else flwr-home/ "
                        "next to --database, else ./flwr-home. Nothing is written to ~/.flwr")
    p.add_argument("flower_args", nargs=argparse.REMAINDER, help="flower-superlink's arguments, after `--`")
    p.set_defaults(func=cmd_superlink)
