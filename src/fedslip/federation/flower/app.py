"""FedSLIP as a Flower app: the shared round protocol in a ServerApp, the shared client side in a ClientApp.

    [tool.flwr.app.components]
    serverapp = "fedslip.federation.flower.app:server_app"
    clientapp = "fedslip.federation.flower.app:client_app"

Run configuration (`[tool.flwr.app.config]`, overridable with `flwr run . --run-config 'key=value ...'`):

    preset        "quick" | "paper" | "reference" | ""   the fedslip preset to start from
    method        a method name                    (`fedslip methods`)
    config-file   path to a fedslip TOML config    ("" = none)
    overrides     "section.key=value; ..."          like `fedslip run --set`, separated by ';'
    out           output folder of the ServerApp    results.json, rounds.csv, ... as `fedslip run`
    min-available partitions that must be online   0 = all of partition.n_clients
    round-timeout seconds to wait for the replies of one round
    node-data     true: each SuperNode reads only its own files (node config train-file, test-file, ...)
    resume        true: go on from the checkpoint in `out` (the nodes keep their private states)

Messages (every one carries a ConfigRecord "config" with `server-round` and `partition-id`): `query` asks a
new node for its partition; `train` carries exactly `method.down_payload(glob, cid)` as the ArrayRecord
"arrays" and, when the previous round awaits its evaluation, `eval-round`/`global-test`/`kstep`; the reply
carries the upload ("arrays"), the training metrics ("metrics") and the scores ("evaluation").
`evaluate` is the same without training (`join`: a held-out client joining after the last round). See
`federation/protocol.py` for the round itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedslip.federation.flower import client
from fedslip.federation.flower.mods import wire_mod
from fedslip.errors import UserError
from fedslip.federation.checkpoint import path_for
from fedslip.federation.flower.runtime import RUN_DEFAULTS, config_from_run, node_data, runtime_for
from fedslip.federation.flower.server import FlowerServer

log = logging.getLogger("flwr")

client_app = ClientApp(mods=[wire_mod])
server_app = ServerApp()


def node_runtime(context: Context):
    if node_data(context.run_config) and "train-file" not in context.node_config:
        raise UserError("the run has node-data = true: start this SuperNode with its own files, --node-config "
                        "'partition-id=K num-partitions=N train-file=\"...\" test-file=\"...\"'")
    return runtime_for(config_from_run(context.run_config), node_config=context.node_config)


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    return client.query_reply(node_runtime(context), msg, context)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    rt = node_runtime(context)
    return client.handle(rt.side, rt.n_clients, msg, context)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    rt = node_runtime(context)
    return client.handle(rt.side, rt.n_clients, msg, context)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    cfg = config_from_run(context.run_config)
    out = Path(str({**RUN_DEFAULTS, **dict(context.run_config)}["out"])).expanduser().resolve()
    server = FlowerServer(grid, cfg, context.run_config)
    server.transport.run_key = str(context.run_id)  # a resumed run takes the key of the run it resumes
    resume = bool({**RUN_DEFAULTS, **dict(context.run_config)}["resume"])
    log.info("fedslip %s on Flower: %d partitions (min available %d), %d rounds, strategy %s; output %s",
             cfg.method.name, server.n_clients, server.transport.min_available, server.method.rounds(),
             getattr(server.aggregation, "name", "method"), out)
    for line in server.method.setting_warnings():
        log.warning("fedslip: %s", line)
    result, _ = server.run(path_for(out, cfg.method.name), resume)
    server.write(out, result, type(grid).__name__, int(context.run_id))
    log.info("fedslip: wrote %s (global acc %s, %.3f MiB in total)", out, result.final.get("global_acc"),
             result.final.get("mib_total"))
