"""The site's side of secure aggregation (SecAgg+, Bell et al. 2020): a ClientApp mod.

A train message that carries a ``secagg`` ConfigRecord is one stage of the protocol the
server's ``server/secagg.py`` drives; any other message passes straight through.

1. ``setup``: two fresh EC key pairs (one to encrypt shares, one for pairwise masks);
   the public keys go back.
2. ``share-keys``: a fresh self-mask seed ``b``; ``b`` and the mask secret key are each
   Shamir-shared among the site's neighbours (threshold ``t``); each neighbour's pair of
   shares is encrypted under the key agreed with it, and the ciphertexts go back (the
   server forwards them; it cannot read them).
3. ``collect-masked-input``: the shares addressed to this site are decrypted and kept;
   the site trains (the rest of the ClientApp runs on the message), and its update
   ``w_k - w`` is clipped to L2 norm ``clip_norm``, quantised by stochastic rounding to
   integers in [0, L], and masked: ``y = q + PRG(b) + sum_j +-PRG(s_kj) mod 2^bits``. Only
   ``y`` leaves; the metrics and the ledger travel as always.
4. ``unmask``: for the neighbours the server lists as survivors, the site returns its
   share of their ``b``; for those listed as dropped, its share of their mask secret key
   -- never both for the same site, and nothing when fewer than ``t`` survived. The
   round's secrets are then erased.
5. ``abort`` (instead of 4, when fewer than ``t`` valid masked inputs arrived): the round's
   secrets are erased, so this site can never reveal them.

The site's spend of the round is written to its ledger as *pending* before its masked input
leaves (``client/app.py``); answering ``unmask`` appends ``released`` to it; ``abort``
appends ``aborted``, and the spend stops counting, only at a site whose policy trusts the
server's abort (``trust-secagg-abort``, client/policy.py; otherwise it stays charged;
docs/aggregation.md, "Aborted rounds").
Either reply carries the site's ledger, so the server's copy follows.

The encoding and primitives are ``contract/secagg.py``'s.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (share_keys_plaintext_concat,
                                                             share_keys_plaintext_separate)

from fedgen.contract import secagg as sa
from fedgen.privacy.ledger import ABORTED, RELEASED
from fedgen.privacy.skellam import DistributedRelease

from .policy import SitePolicy
from .site import ledger_lock, ledger_run, load_ledger, save_ledger, site_id

log = logging.getLogger(__name__)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower ClientApp mod: one stage of secure aggregation, or a pass-through."""
    if sa.RECORD not in msg.content.config_records:
        config = msg.content.config_records.get("config")
        for key in (sa.DISTRIBUTED, sa.PENDING):
            if config is not None and key in config:
                # only this mod may ask for a distributed release (it carries just a share
                # of the noise and must never leave the site unmasked) or a pending spend
                del config[key]
        return call_next(msg, context)
    cfg = msg.content.config_records[sa.RECORD]
    stage = str(cfg.get("stage", ""))
    try:
        if stage == sa.SETUP:
            out = _setup(cfg, context)
        elif stage == sa.SHARE_KEYS:
            out = _share_keys(cfg, context)
        elif stage == sa.COLLECT:
            return _collect(msg, cfg, context, call_next)
        elif stage == sa.UNMASK:
            out = _unmask(cfg, context)
        elif stage == sa.ABORT:
            out = _abort(cfg, context)
        else:
            raise sa.SecAggError(f"unknown secure-aggregation stage {stage!r}")
    except sa.SecAggError as err:
        log.warning("secure aggregation, stage %s: %s", stage, err)
        raise
    return Message(content=RecordDict({sa.RECORD: ConfigRecord(out)}), reply_to=msg)


def _state(context: Context) -> ConfigRecord:
    if sa.STATE not in context.state.config_records:
        raise sa.SecAggError("no secure-aggregation round in progress at this site (setup missing)")
    return context.state.config_records[sa.STATE]


def _setup(cfg: ConfigRecord, context: Context) -> dict:
    params = sa.SecAggParams.from_config(cfg)
    sk_enc, pk_enc = sa.generate_key_pair()
    sk_mask, pk_mask = sa.generate_key_pair()
    state = ConfigRecord({**params.to_config(), "round": int(cfg["round"]), "index": int(cfg["index"]),
                          "neighbours": [int(i) for i in cfg["neighbours"]],
                          "sk-enc": sa.private_bytes(sk_enc), "sk-mask": sa.private_bytes(sk_mask)})
    context.state[sa.STATE] = state
    return {"stage": sa.SETUP, "pk-enc": pk_enc, "pk-mask": pk_mask}


def _share_keys(cfg: ConfigRecord, context: Context) -> dict:
    state = _state(context)
    params = sa.SecAggParams.from_config(state)
    me = int(state["index"])
    indices = [int(i) for i in cfg["indices"]]
    if (not set(indices) <= {int(i) for i in state["neighbours"]} or me not in indices
            or len(set(indices)) != len(indices)):
        raise sa.SecAggError("the keys received are not those of this site's neighbours")
    if len(indices) < params.threshold:
        raise sa.SecAggError(f"{len(indices)} neighbours, fewer than the threshold {params.threshold}")
    pk_enc = dict(zip(indices, (bytes(b) for b in cfg["pk-enc"])))
    pk_mask = dict(zip(indices, (bytes(b) for b in cfg["pk-mask"])))
    if len(set(pk_enc.values())) != len(pk_enc) or len(set(pk_mask.values())) != len(pk_mask):
        raise sa.SecAggError("two neighbours advertised the same public key")
    own_enc, own_mask = sa.load_private(bytes(state["sk-enc"])), sa.load_private(bytes(state["sk-mask"]))
    if pk_enc[me] != sa.public_bytes(own_enc) or pk_mask[me] != sa.public_bytes(own_mask):
        raise sa.SecAggError("the server relayed other public keys for this site than it advertised")
    seed = sa.new_seed()
    b_shares = sa_shares(seed, params.threshold, len(indices))
    sk_shares = sa_shares(bytes(state["sk-mask"]), params.threshold, len(indices))
    sk_enc = own_enc
    dst, cts = [], []
    for pos, j in enumerate(indices):
        if j == me:  # its own shares stay here
            state["own-b-share"], state["own-sk-share"] = b_shares[pos], sk_shares[pos]
            continue
        plain = share_keys_plaintext_concat(me, j, b_shares[pos], sk_shares[pos])
        dst.append(j)
        cts.append(encrypt(sa.shared_key(sk_enc, pk_enc[j]), plain))
    state["seed"] = seed
    state["pk-enc-of"] = [pk_enc[j] for j in indices]
    state["pk-mask-of"] = [pk_mask[j] for j in indices]
    state["neighbours"] = indices  # the order of the pk lists
    return {"stage": sa.SHARE_KEYS, "dst": dst, "ct": cts}


def sa_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir shares of ``secret`` (Flower's ``create_shares``, pycryptodome underneath)."""
    return create_shares(secret, threshold, num)


def _collect(msg: Message, cfg: ConfigRecord, context: Context, call_next: ClientAppCallable) -> Message:
    state = _state(context)
    params = sa.SecAggParams.from_config(state)
    me = int(state["index"])
    neighbours = [int(i) for i in state["neighbours"]]
    pk_enc = dict(zip(neighbours, (bytes(b) for b in state["pk-enc-of"])))
    pk_mask = dict(zip(neighbours, (bytes(b) for b in state["pk-mask-of"])))
    sk_enc = sa.load_private(bytes(state["sk-enc"]))
    srcs = [int(i) for i in cfg.get("src", [])]
    b_from, sk_from = {me: bytes(state["own-b-share"])}, {me: bytes(state["own-sk-share"])}
    for src, ct in zip(srcs, cfg.get("ct", [])):
        if src not in pk_enc or src == me:
            raise sa.SecAggError(f"a share from {src}, not a neighbour of this site")
        got_src, got_dst, b_share, sk_share = share_keys_plaintext_separate(
            decrypt(sa.shared_key(sk_enc, pk_enc[src]), bytes(ct)))
        if (got_src, got_dst) != (src, me):
            raise sa.SecAggError("a share addressed to another pair of sites")
        b_from[src], sk_from[src] = b_share, sk_share
    if len(b_from) < params.threshold:
        raise sa.SecAggError(f"shares from {len(b_from)} sites, fewer than the threshold {params.threshold}")
    state["share-src"] = sorted(b_from)
    state["b-shares"] = [b_from[i] for i in sorted(b_from)]
    state["sk-shares"] = [sk_from[i] for i in sorted(sk_from)]

    global_arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    distributed = str(cfg.get("distributed", ""))
    if distributed:  # noise: distributed -- the training releases an integer sum with its noise share
        _check_distributed(distributed, params)
        msg.content["config"][sa.DISTRIBUTED] = distributed
    del msg.content[sa.RECORD]
    train_config = msg.content["config"]
    if "server-round" in train_config:  # the spend this round records is pending (client/app.py)
        train_config[sa.PENDING] = True
        state["train-round"] = int(train_config["server-round"])
        state["run-dir"] = str(train_config.get("run-dir", ""))
    reply = call_next(msg, context)  # training, with every other mod around it
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply  # nothing to mask: the site failed, refused or dropped out
    if distributed:
        if sa.DISTRIBUTED not in reply.content["arrays"]:
            raise sa.SecAggError("the site's training returned no distributed release to mask")
        y = sa.encode_signed(reply.content["arrays"][sa.DISTRIBUTED].numpy(), params.bits)
    else:
        trained = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        keys = sa.float_keys(global_arrays)
        update, _ = sa.clip_l2(sa.flatten(trained, keys) - sa.flatten(global_arrays, keys), params.clip_norm)
        y = sa.quantize(update, params.clip_norm, params.levels, np.random.default_rng())  # OS entropy
    y = sa.add_mod(y, sa.expand_mask(bytes(state["seed"]), y.size, params.bits), 1, params.bits)
    sk_mask = sa.load_private(bytes(state["sk-mask"]))
    for j in srcs:  # the neighbours that shared their keys: their masks cancel ours
        pair = sa.expand_mask(sa.shared_key(sk_mask, pk_mask[j]), y.size, params.bits)
        y = sa.add_mod(y, pair, sa.pair_sign(me, j), params.bits)
    del reply.content["arrays"]
    reply.content[sa.MASKED] = ArrayRecord({sa.MASKED_KEY: Array(np.ascontiguousarray(y))})
    return reply


def _check_distributed(text: str, params: sa.SecAggParams) -> None:
    """The site checks the release's public parameters against the round's before it
    releases anything: the same modulus and threshold, and a scale whose sum cannot wrap."""
    try:
        release = DistributedRelease.from_json(text)
    except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: a count of 1e400
        raise sa.SecAggError("malformed distributed-noise parameters") from None
    if release.bits != params.bits or release.threshold != params.threshold:
        raise sa.SecAggError("the distributed-noise parameters do not match the round's bits and threshold")
    if release.num_sites < params.num_sites or not (release.mu > 0 and release.scale >= 1) or not release.fits():
        raise sa.SecAggError("the distributed-noise parameters could wrap the sum around or carry no noise")
    if not (0.0 < release.sample_rate <= 1.0 and release.rounds >= 1):
        raise sa.SecAggError("the distributed-noise parameters name no valid sample rate or round count")


def _unmask(cfg: ConfigRecord, context: Context) -> dict:
    state = _state(context)
    params = sa.SecAggParams.from_config(state)
    active = {int(i) for i in cfg.get("active", [])}
    dropped = {int(i) for i in cfg.get("dropped", [])}
    held = [int(i) for i in state.get("share-src", [])]
    if active & dropped:
        raise sa.SecAggError("the server listed a site as both survived and dropped; no shares revealed")
    if not (active | dropped) <= set(held):
        raise sa.SecAggError("the server asked for shares this site does not hold")
    if len(active) < params.threshold:
        raise sa.SecAggError(f"{len(active)} surviving neighbours, fewer than the threshold {params.threshold}; "
                             "no shares revealed")
    b_shares = dict(zip(held, (bytes(b) for b in state["b-shares"])))
    sk_shares = dict(zip(held, (bytes(b) for b in state["sk-shares"])))
    out = {"stage": sa.UNMASK, "b-of": sorted(active), "b-shares": [b_shares[i] for i in sorted(active)],
           "sk-of": sorted(dropped), "sk-shares": [sk_shares[i] for i in sorted(dropped)]}
    ledger = _resolve(context, state, RELEASED)  # the shares leave: the spend is committed
    del context.state[sa.STATE]  # the round's secrets end here
    return out if ledger is None else {**out, "ledger": ledger}


def _abort(cfg: ConfigRecord, context: Context) -> dict:
    """The server aborted the round before asking anyone to unmask: erase the round's
    secrets first (this site can then never reveal its shares), then record the pending
    spend as aborted -- only where the site's policy trusts the server's word for it
    (``trust-secagg-abort``, client/policy.py: a deviating server could have decoded the
    input from the neighbours' shares); otherwise it stays pending, i.e. charged. A crash
    between the two steps also leaves it pending."""
    state = _state(context)
    if int(cfg.get("round", -1)) != int(state["round"]):
        raise sa.SecAggError(f"an abort for round {cfg.get('round')}, but this site is in round {state['round']}")
    del context.state[sa.STATE]
    trusted = SitePolicy.from_node_config(context.node_config).trust_secagg_abort
    if not trusted:
        log.info("site %s: round %s aborted by the server; its spend stays charged (trust-secagg-abort is off)",
                 site_id(context), state.get("train-round"))
    ledger = _resolve(context, state, ABORTED if trusted else None)
    return {"stage": sa.ABORT} if ledger is None else {"stage": sa.ABORT, "ledger": ledger}


def _resolve(context: Context, state: ConfigRecord, outcome: str | None) -> str | None:
    """Append ``outcome`` to the site's pending spend of the round (privacy/ledger.py;
    ``None``: leave it pending) and return its ledger as JSON for the reply; ``None`` when
    the site keeps no ledger."""
    if "train-round" not in state:
        return None
    site, run_dir = site_id(context), str(state.get("run-dir", ""))
    with ledger_lock(context, site, run_dir):
        ledger = load_ledger(context, site, run_dir)
        if ledger is None:
            return None
        if outcome is not None and ledger.resolve(round=int(state["train-round"]), run=ledger_run(context),
                                                  outcome=outcome) is not None:
            save_ledger(context, ledger, run_dir)
            log.info("site %s: round %s's spend %s", site, state["train-round"], outcome)
        return ledger.to_json()
