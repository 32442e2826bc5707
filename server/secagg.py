"""The server's side of secure aggregation (SecAgg+, Bell et al. 2020, on Bonawitz et al.
2017) for Flower's Message API: a workflow :class:`FederatedRun` runs in place of the plain
train round when the scenario sets ``federation.secure_aggregation``.

One round, over the sites the strategy sampled (each stage one ``send_and_receive``):

1. advertise keys (``setup``): every site gets the protocol's parameters, its index in a
   random order and its neighbours; it answers with two public keys;
2. share keys: every site gets its neighbours' public keys and answers with the Shamir
   shares of its mask seed and mask secret key, encrypted for each neighbour;
3. collect masked inputs: every site gets the train task plus the ciphertexts addressed
   to it, trains, and answers with its masked, quantised update (and its metrics and
   ledger in the clear) -- :meth:`SecAggWorkflow.collect` ends here, and the run checks
   the replies' metrics and ledgers as always;
4. unmask (:meth:`SecAggWorkflow.unmask`): the surviving sites reveal their shares of the
   survivors' seeds and of the dropped sites' mask keys; the server removes the masks and
   learns only the integer sum, which it decodes into the mean update.

A site that does not answer a stage drops out of the rest of the round. Fewer than
``threshold`` sites at the masked-input or unmask stage abort the round: nothing is
decoded, the global model stays, and the round's row says why. An abort before any unmask
request is announced to every site that got the masked-input stage (``abort``): each
erases its round secrets, and a site that trusts the server's abort (node-config
``trust-secagg-abort``) records its pending spend as aborted, so its epsilon does not move;
any other site stays charged. The sites' ledgers from the ``unmask`` and ``abort`` replies are kept in
:attr:`SecAggRound.ledgers`. The site side is ``client/secagg.py``; the shared encoding
``contract/secagg.py``.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
import torch
from flwr.serverapp import Grid

from fedgen.contract import secagg as sa
from fedgen.privacy import dp_fedsgd
from fedgen.privacy.skellam import DistributedRelease

log = logging.getLogger(__name__)


@dataclass
class SecAggRound:
    """One round's protocol state and report (``metrics.jsonl``: ``secure_aggregation``)."""

    round: int
    params: sa.SecAggParams
    order: list[int]  # node id at each index
    pk_enc: dict[int, bytes] = field(default_factory=dict)
    pk_mask: dict[int, bytes] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # indices that completed share-keys
    forwarded: set[tuple[int, int]] = field(default_factory=set)  # (src, dst): dst masks with src
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # index -> y
    dropped: dict[str, list[int]] = field(default_factory=dict)  # stage -> node ids that did not answer
    aborted: str | None = None
    total: np.ndarray | None = None  # the unmasked integer sum: all the server learns of the inputs
    sites_aggregated: int = 0
    sites_recovered: int = 0  # dropped after sharing keys, masks removed via their key shares
    #: noise: distributed -- the round's public plan (the sites sum integers with their Skellam
    #: shares instead of quantised updates) and what the released sum carries
    plan: DistributedRelease | None = None
    distributed: dict[str, float] | None = None
    collected: list[int] = field(default_factory=list)  # node ids sent the masked-input stage
    ledgers: dict[int, str] = field(default_factory=dict)  # node -> its ledger (JSON) from unmask / abort
    abort_acknowledged: int = 0  # sites that erased their secrets on the abort (their spend withdrawn)

    def index_of(self, node: int) -> int:
        return self.order.index(node)

    def neighbours(self, index: int) -> list[int]:
        return sa.neighbours(index, len(self.order), self.params.num_neighbours)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"released": self.aborted is None, "sites_sampled": len(self.order),
                               "sites_aggregated": self.sites_aggregated,
                               "sites_dropped_recovered": self.sites_recovered,
                               "threshold": self.params.threshold, "bits": self.params.bits}
        if self.aborted:
            out["aborted"] = self.aborted
            if self.collected:
                out["sites_abort_acknowledged"] = self.abort_acknowledged
        if self.distributed:
            out["distributed_noise"] = self.distributed
        dropped = {k: len(v) for k, v in self.dropped.items() if v}
        if dropped:
            out["dropped_at"] = dropped
        return out


class SecAggWorkflow:
    """SecAgg+ over a ``Grid``; ``rng`` orders the sites (a ``random.SystemRandom`` by default)."""

    def __init__(self, *, threshold: int, bits: int, clip_norm: float, num_neighbours: int | None = None,
                 timeout: float | None = None, rng: Any = None) -> None:
        self.threshold, self.bits, self.clip_norm = threshold, bits, clip_norm
        self.num_neighbours = num_neighbours
        self.timeout = timeout
        self.rng = rng if rng is not None else random.SystemRandom()

    # -- stages 1-3 ---------------------------------------------------------------------
    def collect(self, grid: Grid, server_round: int, train_messages: list[Message],
                distributed: DistributedRelease | None = None) -> tuple[SecAggRound, list[Message], list[Message]]:
        """Stages 1-3 for the sites ``train_messages`` go to: the round's state, the
        masked-input messages sent and their replies (masked inputs, metrics, ledgers).
        ``distributed``: the round's plan of distributed noise (privacy/skellam.py), sent with
        the train task; the sites then mask noised integer sums instead of quantised updates."""
        nodes = [m.metadata.dst_node_id for m in train_messages]
        self.rng.shuffle(nodes)
        params = sa.SecAggParams(threshold=self.threshold, bits=self.bits, clip_norm=self.clip_norm,
                                 num_sites=max(len(nodes), 1), num_neighbours=self.num_neighbours)
        rnd = SecAggRound(round=server_round, params=params, order=nodes, plan=distributed)
        if len(nodes) < self.threshold:
            rnd.aborted = f"{len(nodes)} sites sampled, fewer than the threshold {self.threshold}"
            return rnd, [], []
        try:
            params.check()
        except sa.SecAggError as err:
            rnd.aborted = str(err)
            return rnd, [], []
        by_node = {m.metadata.dst_node_id: m for m in train_messages}

        # 1. advertise keys
        setup = {n: self._stage(sa.SETUP, {**params.to_config(), "round": server_round, "index": i,
                                           "neighbours": rnd.neighbours(i)}) for i, n in enumerate(nodes)}
        for node, cfg in self._exchange(grid, setup, rnd, sa.SETUP).items():
            rnd.pk_enc[node], rnd.pk_mask[node] = bytes(cfg["pk-enc"]), bytes(cfg["pk-mask"])
        alive = [n for n in nodes if n in rnd.pk_enc]
        if (why := self._too_few(len(alive), "advertised keys")) or not alive:
            rnd.aborted = why
            return rnd, [], []

        # 2. share keys: a site whose neighbour dropped at setup cannot share with it; the
        # neighbourhood is what answered (the site checks it still reaches the threshold)
        share: dict[int, dict[str, Any]] = {}
        for node in alive:
            i = rnd.index_of(node)
            nb = [j for j in rnd.neighbours(i) if nodes[j] in rnd.pk_enc]
            share[node] = {"indices": nb, "pk-enc": [rnd.pk_enc[nodes[j]] for j in nb],
                           "pk-mask": [rnd.pk_mask[nodes[j]] for j in nb]}
        inbox: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in alive}
        replies = self._exchange(grid, {n: self._stage(sa.SHARE_KEYS, {"indices": share[n]["indices"],
                                                                       "pk-enc": share[n]["pk-enc"],
                                                                       "pk-mask": share[n]["pk-mask"]})
                                        for n in alive}, rnd, sa.SHARE_KEYS)
        for node, cfg in replies.items():
            rnd.shared.add(rnd.index_of(node))
        for node, cfg in replies.items():
            src = rnd.index_of(node)
            for dst, ct in zip(cfg.get("dst", []), cfg.get("ct", [])):
                dst = int(dst)
                if 0 <= dst < len(nodes) and dst in rnd.shared and nodes[dst] in inbox:
                    rnd.forwarded.add((src, dst))
                    inbox[nodes[dst]][0].append(src)
                    inbox[nodes[dst]][1].append(bytes(ct))
        if why := self._too_few(len(rnd.shared), "shared their keys"):
            rnd.aborted = why
            return rnd, [], []

        # 3. collect masked inputs: the train task plus the shares addressed to the site
        sent: list[Message] = []
        for node in (nodes[i] for i in sorted(rnd.shared)):
            train = by_node[node]
            collect = {"stage": sa.COLLECT, "src": inbox[node][0], "ct": inbox[node][1]}
            if distributed is not None:
                collect["distributed"] = distributed.to_json()
            content = RecordDict({"arrays": train.content["arrays"], "config": train.content["config"],
                                  sa.RECORD: ConfigRecord(collect)})
            sent.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        rnd.collected = [m.metadata.dst_node_id for m in sent]
        return rnd, sent, list(grid.send_and_receive(sent, timeout=self.timeout))

    # -- stage 4 ------------------------------------------------------------------------
    def unmask(self, grid: Grid, rnd: SecAggRound, accepted: list[Message],
               global_arrays: ArrayRecord) -> ArrayRecord | None:
        """The new global model from the masked inputs in ``accepted`` (the replies the run
        validated); ``None`` when the round aborts (``rnd.aborted`` says why)."""
        like = {k: v.numpy() for k, v in global_arrays.items()}
        keys = sa.float_keys(like)
        total = self.unmask_sum(grid, rnd, accepted, int(sum(np.asarray(like[k]).size for k in keys)))
        if total is None:
            return None
        survivors = rnd.sites_aggregated
        mean = sa.dequantize_sum(total, survivors, rnd.params.clip_norm, rnd.params.levels) / survivors
        delta = sa.unflatten(mean, like, keys)
        new = {k: (np.asarray(v) + delta[k]).astype(np.asarray(v).dtype) if k in delta else np.asarray(v)
               for k, v in like.items()}
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()})

    def unmask_sum(self, grid: Grid, rnd: SecAggRound, accepted: list[Message], size: int) -> np.ndarray | None:
        """Stage 4 proper: the integer sum (mod 2^bits) of the valid masked inputs of ``size``
        values in ``accepted``; ``None`` when the round aborts (``rnd.aborted`` says why)."""
        bits = rnd.params.bits
        for msg in accepted:
            node = msg.metadata.src_node_id
            y = _masked_input(msg, size, bits)
            if y is None:
                log.warning("round %d: node %s sent no valid masked input; counted as dropped", rnd.round, node)
                continue
            rnd.masked[rnd.index_of(node)] = y
        survivors = sorted(rnd.masked)
        if why := self._too_few(len(survivors), "sent a valid masked input"):
            rnd.aborted = why
            self._abort(grid, rnd)
            return None
        dropped = sorted(rnd.shared - set(survivors))
        msgs = {}
        for i in survivors:  # ask each survivor only for shares it holds
            held = {src for src, dst in rnd.forwarded if dst == i} | {i}
            msgs[rnd.order[i]] = self._stage(sa.UNMASK, {"active": sorted(held & set(survivors)),
                                                         "dropped": sorted(held & set(dropped))})
        revealed = self._exchange(grid, msgs, rnd, sa.UNMASK)
        rnd.ledgers.update({node: str(cfg["ledger"]) for node, cfg in revealed.items() if "ledger" in cfg})
        if why := self._too_few(len(revealed), "revealed their shares"):
            rnd.aborted = why
            return None
        b_shares: dict[int, list[bytes]] = {}
        sk_shares: dict[int, list[bytes]] = {}
        for cfg in revealed.values():
            for i, s in zip(cfg.get("b-of", []), cfg.get("b-shares", [])):
                b_shares.setdefault(int(i), []).append(bytes(s))
            for j, s in zip(cfg.get("sk-of", []), cfg.get("sk-shares", [])):
                sk_shares.setdefault(int(j), []).append(bytes(s))
        total = np.zeros(size, dtype=np.uint64)
        for i in survivors:
            total = sa.add_mod(total, rnd.masked[i], 1, bits)
        try:
            for i in survivors:  # self masks
                seed = self._reconstruct(b_shares.get(i, []), f"the mask seed of index {i}")
                total = sa.add_mod(total, sa.expand_mask(seed, size, bits), -1, bits)
            for j in dropped:  # pairwise masks the survivors added with a dropped site
                sk = sa.load_private(self._reconstruct(sk_shares.get(j, []), f"the mask key of index {j}"))
                for i in survivors:
                    if (j, i) in rnd.forwarded:  # i received j's shares, so i masked with j
                        pair = sa.expand_mask(sa.shared_key(sk, rnd.pk_mask[rnd.order[i]]), size, bits)
                        total = sa.add_mod(total, pair, -sa.pair_sign(i, j), bits)
        except sa.SecAggError as err:
            rnd.aborted = str(err)
            return None
        rnd.total = total
        rnd.sites_aggregated, rnd.sites_recovered = len(survivors), len(dropped)
        log.info("round %d: secure aggregation of %d sites (%d dropped after sharing keys, recovered)",
                 rnd.round, len(survivors), len(dropped))
        return total

    def release_from_sum(self, rnd: SecAggRound, total: np.ndarray, model: Any) -> float:
        """``noise: distributed``: set the release family's statistic from the unmasked sum
        -- (the sum of every record's rounded vector + Skellam noise) / the noisy record
        count read off the release's own count feature, the central DP-MERF release -- and
        return the per-coordinate variance of the noise it carries (all post-processing)."""
        rel = rnd.plan
        assert rel is not None
        sums = torch.from_numpy(sa.decode_signed(total, rnd.params.bits).astype(np.float64) / rel.scale)
        sums = sums.reshape(model.state_dict()[model.release_buffer].shape)
        count = max(float(sums[..., -1].sum()) / model.count_weight, 1.0)  # noisy, from the release itself
        sigma = math.sqrt(rel.share * rnd.sites_aggregated) / rel.scale  # every survivor's share
        rnd.distributed = {"scale": rel.scale, "skellam_variance": rel.share * rnd.sites_aggregated,
                           "guaranteed_variance": rel.mu, "noise_std": sigma, "noisy_count": count}
        return model.combine_releases(sums.unsqueeze(0), torch.tensor([sigma], dtype=torch.float64), count)

    def gradient_from_sum(self, rnd: SecAggRound, total: np.ndarray, accepted: list[Message], *,
                          clip_norm: float) -> np.ndarray:
        """DP-FedSGD with distributed noise (privacy/dp_fedsgd.py): the noisy mean gradient
        from the unmasked sum -- divided by the scale, times the clip norm, divided by the
        expected batch ``q N``, with ``N`` the records the aggregated sites declared (their
        ``num-examples``, in the clear as in every mode) -- and the round's noise report."""
        rel = rnd.plan
        assert rel is not None
        records = sum(float(next(iter(m.content.metric_records.values()))["num-examples"]) for m in accepted
                      if rnd.index_of(m.metadata.src_node_id) in rnd.masked)
        expected = rel.sample_rate * records
        variance = rel.share * rnd.sites_aggregated
        rnd.distributed = {"scale": rel.scale, "sample_rate": rel.sample_rate, "expected_batch": expected,
                           "skellam_variance": variance, "guaranteed_variance": rel.mu,
                           "noise_std": dp_fedsgd.noise_std(rel, variance, clip_norm=clip_norm,
                                                            expected_batch=expected)}
        return dp_fedsgd.decode_gradient(sa.decode_signed(total, rnd.params.bits), rel, clip_norm=clip_norm,
                                         expected_batch=expected)

    def _abort(self, grid: Grid, rnd: SecAggRound) -> None:
        """Tell every site sent the masked-input stage that the round is aborted before any
        unmask: no share of any self-mask seed was asked for, and none will be, so no masked
        input can be decoded. A site that answers has erased its secrets and withdrawn its
        pending spend; one that does not stays charged (docs/aggregation.md, "Aborted rounds")."""
        if not rnd.collected:
            return
        acked = self._exchange(grid, {n: self._stage(sa.ABORT, {"round": rnd.round}) for n in rnd.collected},
                               rnd, sa.ABORT)
        rnd.abort_acknowledged = len(acked)
        rnd.ledgers.update({node: str(cfg["ledger"]) for node, cfg in acked.items() if "ledger" in cfg})

    # -- helpers ------------------------------------------------------------------------
    def _reconstruct(self, shares: list[bytes], what: str) -> bytes:
        if len(shares) < self.threshold:
            raise sa.SecAggError(f"{len(shares)} shares of {what}, fewer than the threshold {self.threshold}")
        try:
            return combine_shares(shares[:self.threshold])
        except ValueError:
            raise sa.SecAggError(f"the shares of {what} do not combine") from None

    def _too_few(self, count: int, what: str) -> str | None:
        if count >= self.threshold:
            return None
        return f"only {count} sites {what}, fewer than the threshold {self.threshold}; round not aggregated"

    @staticmethod
    def _stage(stage: str, cfg: dict[str, Any]) -> ConfigRecord:
        return ConfigRecord({"stage": stage, **cfg})

    def _exchange(self, grid: Grid, configs: dict[int, ConfigRecord], rnd: SecAggRound,
                  stage: str) -> dict[int, ConfigRecord]:
        """Send one stage's records; the answering nodes' records (the others dropped)."""
        messages = [Message(content=RecordDict({sa.RECORD: cfg}), message_type=MessageType.TRAIN, dst_node_id=node)
                    for node, cfg in configs.items()]
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        out: dict[int, ConfigRecord] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error() or sa.RECORD not in reply.content.config_records:
                continue
            cfg = reply.content.config_records[sa.RECORD]
            if str(cfg.get("stage", "")) == stage and node in configs:
                out[node] = cfg
        missing = [n for n in configs if n not in out]
        if missing:
            rnd.dropped[stage] = missing
            log.info("round %d: %d sites dropped at secure-aggregation stage %s", rnd.round, len(missing), stage)
        return out


def _masked_input(msg: Message, size: int, bits: int) -> np.ndarray | None:
    record = msg.content.array_records.get(sa.MASKED)
    if record is None or sa.MASKED_KEY not in record:
        return None
    try:
        y = np.asarray(record[sa.MASKED_KEY].numpy())
    except Exception:  # noqa: BLE001 -- a malformed payload is a dropped site
        return None
    if y.dtype != np.uint64 or y.shape != (size,) or (y.size and int(y.max()) > sa.modulus_mask(bits)):
        return None
    return y
