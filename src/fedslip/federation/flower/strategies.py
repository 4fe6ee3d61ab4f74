"""Server-side aggregation by Flower's strategies, applied only to what the method shares.

`method.strategy` selects how the server combines the clients' uploads:

* ``method`` (default): the method's own `aggregate` (FedAvg's example-weighted mean for most methods);
  exactly what the in-process engine does.
* a Flower strategy, optionally with parameters: ``fedavg``, ``fedprox:mu=0.01``, ``fedadam:eta=0.01``,
  ``fedavgm:server_momentum=0.9``, ``fedmedian``, ``fedtrimmedavg:beta=0.25``, ``krum:num_malicious_nodes=1``
  (also ``fedyogi``, ``fedadagrad``, ``multikrum``, ``bulyan``). Parameters are the strategy's own keyword
  arguments (see `flwr.serverapp.strategy`), comma-separated, values as TOML literals.

The strategy sees the uploads as Flower reply messages (one `ArrayRecord` of the payload tensors + one
`MetricRecord` with ``num-examples``) and returns the new values of exactly those tensors; anything else of
the global state (and everything private) never reaches it. Sampling stays ours (`select_clients`, seeded),
so only the strategy's `configure_train` bookkeeping (FedOpt's/FedAvgM's current arrays, FedProx's
``proximal-mu``) and its `aggregate_train` are used.

FedProx's ``proximal-mu`` replaces the method's proximal coefficient on the global track on the clients
(`Method.set_proximal_mu`). A method whose down payloads differ between clients, or whose uploads are not the same
tensors as its down payload, cannot use the adaptive strategies (FedOpt family, FedAvgM): they are defined
as steps from "the arrays sent" to "the aggregate".
"""

from __future__ import annotations

import tomllib
from typing import Any

import numpy as np
import torch

from fedslip.errors import UserError
from fedslip.federation.payload import Payload
from fedslip.federation.flower.records import ARRAYS, CONFIG, METRICS, payload_to_record, record_to_payload

STRATEGIES = {
    "fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam", "fedavgm": "FedAvgM",
    "fedmedian": "FedMedian", "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum", "multikrum": "MultiKrum",
    "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad", "bulyan": "Bulyan",
}
ALIASES = {"mu": "proximal_mu", "beta": "beta"}  # short names for the common parameters


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (name, kwargs)."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise UserError(f"method.strategy = {spec!r}: expected name:key=value,... (got {item!r})")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            kwargs[ALIASES.get(key, key)] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            raise UserError(f"method.strategy = {spec!r}: {key} = {raw!r} is not a number or TOML literal") from None
    if name != "method" and name not in STRATEGIES:
        raise UserError(f"method.strategy = {spec!r}: unknown strategy {name!r} "
                        f"(known: method, {', '.join(STRATEGIES)})")
    if name == "method" and kwargs:
        raise UserError(f"method.strategy = {spec!r}: the method's own aggregation takes no parameters")
    return name, kwargs


def make_strategy(spec: str):
    """The Flower strategy for `spec`, or None for the method's own aggregation."""
    name, kwargs = parse_spec(spec)
    if name == "method":
        return None
    from flwr.serverapp import strategy as flwr_strategies

    cls = getattr(flwr_strategies, STRATEGIES[name])
    base = {"fraction_train": 1.0, "min_train_nodes": 1, "min_available_nodes": 1}
    try:
        return cls(**{**base, **kwargs})
    except (TypeError, ValueError) as e:
        raise UserError(f"method.strategy = {spec!r}: {e}") from None


class _FixedNodes:
    """The least of a Grid a strategy's `configure_train` needs: the node ids (all of them are sampled)."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


class StrategyAggregation:
    """Aggregate uploads with a Flower strategy; keeps the strategy's state across rounds."""

    def __init__(self, spec: str):
        self.spec = spec
        self.strategy = make_strategy(spec)
        self.configured_round = 0
        self.train_config: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return type(self.strategy).__name__

    def configure(self, rnd: int, sent: Payload, n_nodes: int = 1) -> dict[str, Any]:
        """Tell the strategy what is sent this round; return the config it adds to train messages."""
        from flwr.app import ConfigRecord

        from fedslip.federation.flower.local_grid import ensure_task_identity

        ensure_task_identity()
        if self.configured_round == rnd:
            return self.train_config
        config = ConfigRecord()
        nodes = _FixedNodes(list(range(1, n_nodes + 1)))
        list(self.strategy.configure_train(rnd, payload_to_record(sent), config, nodes))  # messages unused
        self.configured_round = rnd
        self.train_config = {k: v for k, v in config.items() if k != "server-round"}
        return self.train_config

    # --- checkpoints: the arrays a strategy carries across rounds (FedOpt's moments, FedAvgM's momentum) --------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
        """(tensors, layout): every attribute holding arrays, as `<attr>/<key>` tensors; its kind and key order."""
        from flwr.app import ArrayRecord

        tensors, layout = {}, {}
        for attr, value in vars(self.strategy).items():
            if isinstance(value, ArrayRecord):
                kind, items = "arrayrecord", list(record_to_payload(value).items())
            elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
                kind, items = "dict", [(k, torch.from_numpy(np.array(v))) for k, v in value.items()]
            elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
                kind, items = "list", [(str(i), torch.from_numpy(np.array(v))) for i, v in enumerate(value)]
            else:
                continue
            layout[attr] = [kind, [k for k, _ in items]]
            tensors.update({f"{attr}/{k}": t for k, t in items})
        return tensors, layout

    def restore(self, tensors: dict[str, torch.Tensor], layout: dict[str, list]) -> None:
        for attr, (kind, keys) in layout.items():
            items = [(k, tensors[f"{attr}/{k}"]) for k in keys]
            if kind == "arrayrecord":
                value = payload_to_record(dict(items))
            elif kind == "dict":
                value = {k: t.numpy() for k, t in items}
            else:
                value = [t.numpy() for _, t in items]
            setattr(self.strategy, attr, value)

    def aggregate_messages(self, rnd: int, replies: list, glob: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays, _ = self.strategy.aggregate_train(rnd, replies)
        if arrays is None:
            return glob
        new = record_to_payload(arrays)
        unknown = set(new) - set(glob)
        if unknown:
            raise UserError(f"strategy {self.name}: uploads carry tensors the global state lacks: "
                            f"{sorted(unknown)[:3]}")
        return {**glob, **{k: v.to(glob[k].dtype) for k, v in new.items()}}

    def __call__(self, ups: list[tuple[Payload, int]], glob: dict[str, torch.Tensor], rnd: int,
                  participants: list[int]) -> dict[str, torch.Tensor]:
        """The round protocol's aggregation step, as `Method.aggregate`."""
        return self.aggregate(ups, glob, rnd)

    def aggregate(self, ups: list[tuple[Payload, int]], glob: dict[str, torch.Tensor], rnd: int,
                  sent: Payload | None = None) -> dict[str, torch.Tensor]:
        """Aggregate (payload, n_examples) uploads."""
        if not ups:
            return glob
        sent = sent if sent is not None else {k: glob[k] for k in ups[0][0]}
        self.configure(rnd, sent, len(ups))
        return self.aggregate_messages(rnd, replies_for(ups, rnd), glob)


def replies_for(ups: list[tuple[Payload, int]], rnd: int) -> list:
    """Flower reply messages carrying the uploads, as a ServerApp receives them."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from fedslip.federation.flower.local_grid import ensure_task_identity

    ensure_task_identity()
    out = []
    for k, (payload, n) in enumerate(ups):
        ins = Message(RecordDict({CONFIG: ConfigRecord({"server-round": rnd})}), k + 1, MessageType.TRAIN,
                      group_id=str(rnd))
        out.append(Message(RecordDict({ARRAYS: payload_to_record(payload),
                                       METRICS: MetricRecord({"num-examples": int(n)})}), reply_to=ins))
    return out

