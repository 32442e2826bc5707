"""``fedgen check-data``: a site checks its data before joining a federation (docs/deploy.md §3).

It reads the data exactly as the site's SuperNode will -- the same ``--node-config`` text,
the same keys (``contract/data_formats.py``: ``site_data_config``), the same reader -- and
prints how many records it holds, of which shape and classes. Nothing is written.
"""

from __future__ import annotations

import argparse

from fedgen.client.data import load_data
from fedgen.client.errors import DataError
from fedgen.contract.data_formats import parse_node_config, site_data_config


def check_site_data(node_config_text: str) -> str:
    """The one-line report of the data ``--node-config`` describes; a one-line
    :class:`DataError` naming what is wrong (an unknown key, a missing file, a bad value)."""
    try:
        cfg = site_data_config(parse_node_config(node_config_text), strict=True)
    except ValueError as err:
        raise DataError(str(err)) from None
    data = load_data(cfg.format, cfg.path, cfg.options)
    n = len(data)
    if len(data.shape) == 1:
        what = f"{n} rows of {data.shape[0]} feature columns"
    else:
        what = f"{n} {'images' if len(data.shape) == 3 else 'examples'} of shape {list(data.shape)}"
    classes = (f"{data.num_classes} classes (labels 0..{data.num_classes - 1})" if data.num_classes
               else "unlabelled")
    return f"ok: {cfg.path} ({cfg.format}): {what}, {classes}, values in [0, 1] after scaling"


def cmd_check_data(args: argparse.Namespace) -> int:
    print(check_site_data(args.node_config))
    return 0


def add_check_data_parser(sub) -> None:
    p = sub.add_parser("check-data", help="check a site's data as its SuperNode will read it",
                       description="Read the data that --node-config describes (data-path, data-format and the "
                       "reader keys of docs/deploy.md §3) exactly as the site's SuperNode will, and report its "
                       "row count and classes. Writes nothing.")
    p.add_argument("--node-config", required=True, metavar="'data-path=... feature-stats=...'",
                   help="the SuperNode's --node-config text (site and privacy keys are accepted and ignored)")
    p.set_defaults(func=cmd_check_data)
