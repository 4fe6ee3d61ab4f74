"""What a run measures, as plain records shared by the engine, the output writers and the report.

Accuracies are fractions in [0, 1]. A metric a method does not have (e.g. K-step accuracy for fedslip,
global accuracy for a round that was not evaluated) is `None`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoundRecord:
    round: int
    train_loss: float  # mean training loss over the round's local steps (all participants)
    mib_round: float  # MiB of training traffic this round: every selected client, up + down
    mib_cumulative: float
    evaluated: bool = False
    global_acc: float | None = None  # balanced global test set, global model
    client_acc: list[float] | None = None  # global model on each client's own test set
    personal_acc: list[float] | None = None  # personal, synced: the client's own state on this global model
    participants: list[int] = field(default_factory=list)  # clients whose uploads were aggregated
    failed: list[int] = field(default_factory=list)  # selected, but no upload arrived
    rejected: list[int] = field(default_factory=list)  # an upload arrived and failed the server's checks
    eval_mib: float = 0.0  # MiB of evaluation-only downloads that scored this round's model
    persistent_acc: list[float] | None = None  # personal, persistent: the model as it left its last training


@dataclass
class ClientRecord:
    client: int
    n_train: int
    n_test: int
    dominant_label: int | None  # the client's most frequent training label
    client_acc: float | None  # global model on this client's test set (last round)
    personal_acc: float | None  # personal, synced: own state on the final global model, no extra fine-tuning
    kstep_acc: float | None = None  # fedavg: after K local fine-tuning steps from the final global model
    persistent_acc: float | None = None  # personal, persistent: the model as it left its last local training
    held_out: bool = False  # partition.holdout_clients: never trained; joined once after the last round
    newcomer_acc: float | None = None  # held out: its model after joining (the method's join_view)
    newcomer_global_acc: float | None = None  # held out: the final global model on its test set
    # which test examples the personal (synced) and K-step views got right: "0"/"1" per example, in the
    # client's test order (train.eval_per_example); in results.json, not in clients.csv
    personal_right: str | None = None
    kstep_right: str | None = None


@dataclass
class MethodResult:
    method: str
    rounds: list[RoundRecord] = field(default_factory=list)
    clients: list[ClientRecord] = field(default_factory=list)
    final: dict[str, float | None] = field(default_factory=dict)  # see evaluation.metrics.summarize
    wall_time_s: float = 0.0
