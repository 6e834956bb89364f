"""`pigeon bench` sub-commands: one per scenario, and `all`.

Each spawns a fresh server (pinned with `--server-cpu`) or targets `--url`, runs its scenario
from generator processes (pinned with `--client-cpu`), writes `<out>/<scenario>-<time>.json`
and prints a summary.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pigeon.bench import (
    abuse,
    capacity,
    compare,
    crypto,
    ejabberd,
    idle,
    instructions,
    keys,
    offline,
    one_to_one,
    presence_storm,
    push,
    store_path,
)
from pigeon.bench.report import Run, print_summary, write_result
from pigeon.bench.server import ServerHandle, Store, Target, pin, raise_nofile, server
from pigeon.bench.store import ADMIN_DSN_ENV, REDIS_URL_ENV, PinError
from pigeon.bench.workers import run_loop

bench_app = typer.Typer(
    no_args_is_help=True, help="Benchmarks against a running or spawned server."
)

Url = Annotated[str | None, typer.Option(help="Target a running server instead of spawning one.")]
ServerPid = Annotated[
    int | None, typer.Option(help="With --url: the server's pid, to read its RSS and CPU.")
]
ServerCpu = Annotated[int | None, typer.Option(help="Pin the spawned server(s) to this core.")]
ClientCpu = Annotated[int | None, typer.Option(help="Pin the load generators to this core.")]
PostgresCpu = Annotated[
    int | None,
    typer.Option(
        help="With --store postgres on this machine: pin PostgreSQL's processes (the backends"
        " it starts too) to this core for the run, as they were after.",
    ),
]
Workers = Annotated[
    int,
    typer.Option(
        min=1,
        help="Processes per server (`pigeon serve --workers N`; with --url: how many answer"
        " /healthz). Above 1 implies --store postgres.",
    ),
]
Nodes = Annotated[
    int,
    typer.Option(
        min=1,
        help="Spawn N servers on their own ports sharing one store; one-to-one then sends every"
        " message across nodes. Above 1 implies --store postgres.",
    ),
]
StoreOption = Annotated[
    Store | None,
    typer.Option(
        help="Spawned server's store: sqlite, or postgres (a fresh database on"
        f" ${ADMIN_DSN_ENV}, dropped after, with Redis bus and presence on ${REDIS_URL_ENV}).",
    ),
]
Out = Annotated[Path, typer.Option(help="Directory for the JSON result files.")]
DataDir = Annotated[Path | None, typer.Option(help="Parent of the spawned server's temp data dir.")]
Synchronous = Annotated[str, typer.Option(help="Spawned server's SQLite synchronous mode.")]
ServerEnv = Annotated[
    list[str] | None,
    typer.Option(help="Extra KEY=VALUE env for the spawned server (KEY= unsets KEY)."),
]
DEFAULT_OUT = Path("bench-results")

Runner = Callable[[ServerHandle, int | None], Awaitable[dict[str, Any]]]
Summary = Callable[[dict[str, Any]], list[tuple[str, Any]]]


def _target(
    url: Url = None,
    server_pid: ServerPid = None,
    server_cpu: ServerCpu = None,
    client_cpu: ClientCpu = None,
    workers: Workers = 1,
    nodes: Nodes = 1,
    store: StoreOption = None,
    data_dir: DataDir = None,
    synchronous: Synchronous = "FULL",
    server_env: ServerEnv = None,
    postgres_cpu: PostgresCpu = None,
) -> Target:
    """The options every scenario shares (see `with_target`): where the load goes."""
    if url is not None and (nodes > 1 or store is not None):
        raise typer.BadParameter("--nodes and --store apply to a spawned server, not --url")
    shared = workers > 1 or nodes > 1
    store = store or (Store.postgres if shared else Store.sqlite)
    if shared and store is not Store.postgres:
        raise typer.BadParameter("--workers/--nodes > 1 need shared state: --store postgres")
    env = {"PIGEON_STORE__SYNCHRONOUS": synchronous.upper()} if store is Store.sqlite else {}
    for item in server_env or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--server-env wants KEY=VALUE, got {item!r}")
        env[key] = value
    if postgres_cpu is not None and (url is not None or store is not Store.postgres):
        raise typer.BadParameter("--postgres-cpu applies to a spawned server on --store postgres")
    return Target(
        url, server_pid, server_cpu, client_cpu, data_dir, env, workers, nodes, store, postgres_cpu
    )


def with_target(command: Callable[..., None]) -> Callable[..., None]:
    """Declare `command(<own options>, *, target: Target, out: Path)` as a command that takes
    its own options plus the shared ones (those of `_target`, and `--out`), so each scenario
    does not repeat them."""
    shared = inspect.signature(_target, eval_str=True).parameters
    own = inspect.signature(command, eval_str=True).parameters
    out = inspect.Parameter(
        "out", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_OUT, annotation=Out
    )
    params = [p for name, p in own.items() if name not in ("target", "out")]
    params += [*shared.values(), out]

    @functools.wraps(command)
    def wrapper(**options: Any) -> None:
        target = _target(**{name: options.pop(name) for name in shared})
        try:
            command(target=target, **options)
        except PinError as exc:
            typer.echo(f"pigeon: error: {exc}", err=True)
            raise typer.Exit(1) from None

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def _single_node(target: Target, scenario: str) -> Target:
    if target.nodes > 1:
        raise typer.BadParameter(f"{scenario} talks to one node: only one-to-one takes --nodes")
    return target


GRACE_ENV = "PIGEON_PRESENCE__GRACE"


def _with_grace(target: Target, grace: float) -> Target:
    """The target with the spawned server's presence grace set to `grace` (unless --server-env
    already sets it: then it must agree)."""
    given = target.server_env.get(GRACE_ENV)
    if given is not None:
        if float(given) != grace:
            raise typer.BadParameter(f"--server-env {GRACE_ENV}={given} disagrees with {grace}")
        return target
    return dataclasses.replace(target, server_env=target.server_env | {GRACE_ENV: str(grace)})


def _execute(
    title: str, target: Target, out: Path, runner: Runner, summary: Summary, nofile: int = 65536
) -> dict[str, Any]:
    raise_nofile(nofile)

    async def main() -> dict[str, Any]:
        async with server(target, nofile=nofile) as handle:
            if target.client_cpu is not None:
                pin(target.client_cpu)  # after spawning, so the server does not inherit it
            return await runner(handle, target.client_cpu)

    doc = run_loop(main())
    doc["params"] |= target.describe()
    path = write_result(out, doc)
    print_summary(title, [*summary(doc), ("result file", str(path))], doc["problems"])
    return doc


@bench_app.command("one-to-one")
@with_target
def one_to_one_cmd(
    devices: Annotated[int, typer.Option(help="Connected devices (N/2 direct chats).")] = 200,
    inflight: Annotated[int, typer.Option(help="Sends outstanding per sender.")] = 10,
    duration: Annotated[float, typer.Option(help="Measured seconds.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Seconds before measuring.")] = 2.0,
    rate: Annotated[
        float | None, typer.Option(help="Open loop: total offered msgs/s (default: closed loop).")
    ] = None,
    size: Annotated[int, typer.Option(help="Message body size in bytes.")] = 64,
    procs: Annotated[int, typer.Option(help="Generator processes.")] = 1,
    presence_watchers: Annotated[
        int,
        typer.Option(
            help="Presence subscriptions active during the run: each device watches its partner"
            " and, above 1, shares a group with K other devices it watches (0: off)."
        ),
    ] = 0,
    presence_churn: Annotated[
        int,
        typer.Option(
            help="Extra users that connect/disconnect during the run, each watched by"
            " max(1, K) devices, so presence frames flow while messages do."
        ),
    ] = 0,
    presence_churn_period: Annotated[
        float, typer.Option(help="Seconds of one churn cycle (half online, half offline).")
    ] = 2.0,
    presence_grace: Annotated[
        float,
        typer.Option(
            help="The server's presence grace; a spawned server gets it when churning. Churners"
            " stay offline longer than it."
        ),
    ] = 0.5,
    *,
    target: Target,
    out: Path,
) -> None:
    """1:1 chats between online devices: delivered msgs/s and send-to-receive latency."""
    if presence_churn > 0:
        target = _with_grace(target, presence_grace)
    p = one_to_one.Params(
        devices,
        inflight,
        duration,
        warmup,
        rate,
        size,
        procs,
        presence_watchers=presence_watchers,
        presence_churn=presence_churn,
        presence_churn_period=presence_churn_period,
        presence_grace=presence_grace,
    )
    _execute(
        "one-to-one",
        target,
        out,
        lambda h, cpu: one_to_one.run(h, p, client_cpu=cpu),
        one_to_one.summary,
    )


@bench_app.command("offline")
@with_target
def offline_cmd(
    count: Annotated[int, typer.Option(help="Messages sent to the offline device.")] = 10_000,
    inflight: Annotated[int, typer.Option(help="Sends outstanding.")] = 200,
    size: Annotated[int, typer.Option(help="Message body size in bytes.")] = 64,
    timeout: Annotated[float, typer.Option(help="Give up on the drain after this.")] = 300.0,
    *,
    target: Target,
    out: Path,
) -> None:
    """A backlog for an offline device: time to store it, then to deliver it on connect."""
    target = _single_node(target, "offline")
    p = offline.Params(count, inflight, size, timeout)
    _execute(
        "offline", target, out, lambda h, cpu: offline.run(h, p, client_cpu=cpu), offline.summary
    )


@bench_app.command("push")
@with_target
def push_cmd(
    senders: Annotated[int, typer.Option(help="Connected sending devices.")] = 20,
    recipients: Annotated[int, typer.Option(help="Offline devices with a push target.")] = 400,
    inflight: Annotated[int, typer.Option(help="Closed-loop sends outstanding per sender.")] = 5,
    duration: Annotated[float, typer.Option(help="Seconds of each measured phase.")] = 8.0,
    rate: Annotated[float, typer.Option(help="Open-loop msgs/s (outage, steady).")] = 500.0,
    outage: Annotated[float, typer.Option(help="Seconds the gateway answers 503.")] = 10.0,
    timeout: Annotated[float, typer.Option(help="Give up on a drain after this.")] = 120.0,
    *,
    target: Target,
    out: Path,
) -> None:
    """Push: message-path cost (push off vs on), a gateway outage and recovery, and
    commit-to-gateway latency, against a fake webhook gateway run by the bench."""
    target = _single_node(target, "push")
    if target.url is None and target.store is not Store.sqlite:
        raise typer.BadParameter("push runs on the embedded store only (for now)")
    target = dataclasses.replace(target, server_env=push.SERVER_ENV | target.server_env)
    p = push.Params(senders, recipients, inflight, duration, rate, outage, timeout)
    _execute("push", target, out, lambda h, cpu: push.run(h, p, client_cpu=cpu), push.summary)


@bench_app.command("idle")
@with_target
def idle_cmd(
    connections: Annotated[int, typer.Option(help="Idle connections to open.")] = 10_000,
    devices_per_user: Annotated[
        int, typer.Option(help="Devices per bench user (server limit, default 3).")
    ] = 3,
    procs: Annotated[int, typer.Option(help="Generator processes.")] = 2,
    hold: Annotated[float, typer.Option(help="Idle seconds before reading the RSS.")] = 3.0,
    concurrency: Annotated[int, typer.Option(help="Connects in flight per generator.")] = 50,
    *,
    target: Target,
    out: Path,
) -> None:
    """Memory per idle authenticated connection (server RSS delta / connections)."""
    target = _single_node(target, "idle")
    p = idle.Params(connections, devices_per_user, procs, hold, concurrency)
    _execute(
        "idle",
        target,
        out,
        lambda h, cpu: idle.run(h, p, client_cpu=cpu),
        idle.summary,
        nofile=connections + 4096,
    )


@bench_app.command("presence-storm")
@with_target
def presence_storm_cmd(
    churners: Annotated[int, typer.Option(help="Users (one device each) that churn.")] = 2000,
    subscribers: Annotated[int, typer.Option(help="Users (one device each) that watch.")] = 200,
    watch: Annotated[int, typer.Option(help="Churners watched by each subscriber.")] = 100,
    waves: Annotated[int, typer.Option(help="Connect-all / disconnect-all waves.")] = 5,
    hold: Annotated[float, typer.Option(help="Seconds online after a wave connected.")] = 1.0,
    settle: Annotated[
        float, typer.Option(help="Seconds beyond the grace before the next wave.")
    ] = 1.0,
    grace: Annotated[
        float,
        typer.Option(
            help="Server presence grace (set on a spawned server; with --url: its value)."
        ),
    ] = 0.5,
    group_cap: Annotated[
        int, typer.Option(help="The server's group cap: watched users per group is cap - 1.")
    ] = 100,
    concurrency: Annotated[
        int, typer.Option(help="Connects/closes in flight per churn proc.")
    ] = 100,
    procs: Annotated[int, typer.Option(help="Churn generator processes.")] = 1,
    sub_procs: Annotated[int, typer.Option(help="Subscriber generator processes.")] = 1,
    tail_timeout: Annotated[
        float, typer.Option(help="After the last wave, wait this long for missing frames.")
    ] = 10.0,
    *,
    target: Target,
    out: Path,
) -> None:
    """Churners connect and disconnect in waves while subscribers watch: presence events/s and
    change-to-notification delays."""
    target = _with_grace(_single_node(target, "presence-storm"), grace)
    p = presence_storm.Params(
        churners,
        subscribers,
        watch,
        waves,
        hold,
        settle,
        grace,
        group_cap,
        concurrency,
        procs,
        sub_procs,
        tail_timeout,
    )
    _execute(
        "presence-storm",
        target,
        out,
        lambda h, cpu: presence_storm.run(h, p, client_cpu=cpu),
        presence_storm.summary,
        nofile=churners + subscribers + 4096,
    )


@bench_app.command("all")
@with_target
def all_cmd(*, target: Target, out: Path) -> None:
    """The four scenarios with their defaults, each against a fresh server when spawning."""
    target = _single_node(target, "all")
    p1, p2, p3, p4 = one_to_one.Params(), offline.Params(), idle.Params(), presence_storm.Params()
    _execute(
        "one-to-one",
        target,
        out,
        lambda h, cpu: one_to_one.run(h, p1, client_cpu=cpu),
        one_to_one.summary,
    )
    _execute(
        "offline", target, out, lambda h, cpu: offline.run(h, p2, client_cpu=cpu), offline.summary
    )
    _execute(
        "idle",
        target,
        out,
        lambda h, cpu: idle.run(h, p3, client_cpu=cpu),
        idle.summary,
        nofile=p3.connections + 4096,
    )
    _execute(
        "presence-storm",
        _with_grace(target, p4.grace),
        out,
        lambda h, cpu: presence_storm.run(h, p4, client_cpu=cpu),
        presence_storm.summary,
        nofile=p4.churners + p4.subscribers + 4096,
    )


@bench_app.command("compare")
@with_target
def compare_cmd(
    pairs: Annotated[int, typer.Option(help="Sender/receiver pairs (one direct chat each).")] = 100,
    inflight: Annotated[
        int, typer.Option(help="Saturation: sends outstanding per pair (0: no saturation run).")
    ] = 10,
    rates: Annotated[
        str, typer.Option(help="Open-loop runs: total offered msgs/s, comma-separated.")
    ] = "1000,2000",
    duration: Annotated[float, typer.Option(help="Measured seconds per run.")] = 8.0,
    warmup: Annotated[float, typer.Option(help="Seconds before measuring.")] = 2.0,
    size: Annotated[int, typer.Option(help="Message body size in bytes.")] = 100,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; the table shows medians.")] = 1,
    targets: Annotated[
        str,
        typer.Option(
            help="Comma-separated: relay, pigeon, ejabberd (ejabberd when installed: it is"
            " started with a config of its own, one scheduler, on --server-cpu)."
        ),
    ] = "relay,pigeon",
    ride_acks: Annotated[
        bool, typer.Option(help="Senders' acks ride on their next send (off: separate acks).")
    ] = True,
    e2e: Annotated[
        bool,
        typer.Option(
            help="Pigeon only: encrypted chats, each message an e2e envelope (ciphertext of"
            " --size, stamped) instead of a body."
        ),
    ] = False,
    *,
    target: Target,
    out: Path,
) -> None:
    """Pigeon against the bare relay (and ejabberd, if listed) on one workload, with a light
    generator: msgs/s, latency and server CPU per message as ratios (pin with --server-cpu 0
    --client-cpu 1)."""
    target = _single_node(target, "compare")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = set(names) - set(compare.RUNNERS)
    if unknown:
        raise typer.BadParameter(
            f"unknown targets {sorted(unknown)}; known: {list(compare.RUNNERS)}"
        )
    if "ejabberd" in names and not ejabberd.installed():
        raise typer.BadParameter(ejabberd.NOT_INSTALLED, param_hint="--targets")
    if e2e and names != ["pigeon"]:
        raise typer.BadParameter("--e2e applies to Pigeon only: use --targets pigeon")
    base = compare.Workload(pairs, inflight, None, duration, warmup, size, ride_acks, e2e)
    workloads = ([base] if inflight > 0 else []) + [
        dataclasses.replace(base, rate=float(r)) for r in rates.split(",") if r.strip()
    ]

    async def main() -> list[compare.Result]:
        if target.client_cpu is not None:
            pin(target.client_cpu)
        return await compare.compare(names, workloads, target, rounds)

    params = dataclasses.asdict(base) | {"rates": rates, "rounds": rounds} | target.describe()
    run = Run("compare", params)
    results = run_loop(main())
    path = write_result(out, run.finish(results=[dataclasses.asdict(r) for r in results]))
    for line in compare.table(results, names):
        print(line)
    print(f"result file {path}")


@bench_app.command("keys")
@with_target
def keys_cmd(
    claimers: Annotated[int, typer.Option(help="Users claiming the target's keys at once.")] = 50,
    target_devices: Annotated[
        int, typer.Option(help="The target user's devices (a key claimed for each).")
    ] = 3,
    keys_per_device: Annotated[
        int, typer.Option(help="One-time keys each target device uploads before each round.")
    ] = 40,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of simultaneous claims.")] = 10,
    *,
    target: Target,
    out: Path,
) -> None:
    """`keys_claim` latency with many claimers at once on one user's devices, the fallback keys
    handed out, and a check that no one-time key is handed out twice."""
    target = _single_node(target, "keys")
    p = keys.Params(claimers, target_devices, keys_per_device, rounds)

    async def runner(handle: ServerHandle, client_cpu: int | None) -> dict[str, Any]:
        return await keys.run(handle, p)

    _execute("keys", target, out, runner, keys.summary)


@bench_app.command("crypto")
def crypto_cmd(
    messages: Annotated[
        int, typer.Option(min=1, help="Messages encrypted, then decrypted.")
    ] = 2000,
    devices: Annotated[int, typer.Option(min=1, help="Member devices of the group.")] = 100,
    size: Annotated[int, typer.Option(help="Message body size in characters.")] = 100,
    shares: Annotated[int, typer.Option(min=1, help="Room key shares measured per case.")] = 5,
    out: Out = DEFAULT_OUT,
) -> None:
    """The SDK's CPU cost per encrypted message (Megolm encrypt/decrypt) and of sharing a room
    key with a group's devices over Olm, in µs, with no server (pin it with taskset)."""
    p = crypto.Params(messages, devices, size, shares)
    run = Run("crypto", dataclasses.asdict(p))
    results = crypto.run(p)
    path = write_result(out, run.finish(results=results))
    print_summary("crypto", [*crypto.summary(results), ("result file", str(path))], [])


@bench_app.command("instructions")
def instructions_cmd(
    pairs: Annotated[
        int, typer.Option(min=1, help="Chats, one sender and one recipient each.")
    ] = 10,
    short: Annotated[int, typer.Option(min=0, help="Rounds of the shorter run.")] = 5,
    long: Annotated[int, typer.Option(min=1, help="Rounds of the longer run.")] = 25,
    size: Annotated[int, typer.Option(min=1, help="Message body size in characters.")] = 100,
    synchronous: Annotated[str, typer.Option(help="SQLite synchronous mode.")] = "FULL",
    out: Out = DEFAULT_OUT,
) -> None:
    """Instructions per delivered message on the SQLite store path (send, the recipient's ack,
    the sender's ack of its receipt), counted by callgrind: a figure the machine's load does
    not move. Needs valgrind."""
    if long <= short:
        raise typer.BadParameter("must be more than --short", param_hint="--long")
    if synchronous not in ("FULL", "NORMAL"):
        raise typer.BadParameter("FULL or NORMAL", param_hint="--synchronous")
    p = instructions.Params(pairs, short, long, size, synchronous)
    run = Run("instructions", dataclasses.asdict(p))
    try:
        result = instructions.count(p)
    except instructions.NoValgrind as exc:
        typer.echo(f"pigeon: error: {exc}", err=True)
        raise typer.Exit(1) from None
    path = write_result(out, run.finish(results=dataclasses.asdict(result)))
    print_summary(
        "instructions", [*instructions.summary(p, result), ("result file", str(path))], []
    )


@bench_app.command("store-path")
def store_path_cmd(
    shapes: Annotated[
        str,
        typer.Option(
            help="Comma-separated PAIRSxPER_ACK: chats (about the jobs per commit) and the"
            " messages each ack covers.",
        ),
    ] = "1x1,2x1,4x1,8x1,32x1,100x1,100x10",
    messages: Annotated[
        int, typer.Option(min=10, help="Messages of each shape's longer run.")
    ] = 6000,
    size: Annotated[int, typer.Option(min=1, help="Message body size in characters.")] = 100,
    synchronous: Annotated[str, typer.Option(help="SQLite synchronous mode.")] = "FULL",
    cpu: Annotated[int | None, typer.Option(help="Pin this process to this core.")] = None,
    out: Out = DEFAULT_OUT,
) -> None:
    """CPU per delivered message on the SQLite store path alone (send, the recipient's ack,
    the sender's ack of its receipt; no sockets), by batch shape: the floor under what the
    server costs per message at moderate load and at saturation."""
    try:
        parsed = [store_path.Shape.parse(s) for s in shapes.split(",")]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shapes") from None
    if synchronous not in ("FULL", "NORMAL"):
        raise typer.BadParameter("FULL or NORMAL", param_hint="--synchronous")
    pin(cpu)
    params = {"shapes": shapes, "messages": messages, "size": size}
    run = Run("store-path", {**params, "synchronous": synchronous, "cpu": cpu})
    rows = [store_path.measure(s, messages, size, synchronous) for s in parsed]
    path = write_result(out, run.finish(results=[dataclasses.asdict(r) for r in rows]))
    for line in store_path.table(rows):
        print(line)
    print(f"result file {path}")


@bench_app.command("abuse")
@with_target
def abuse_cmd(
    members: Annotated[int, typer.Option(help="Group flood: members of the flooded group.")] = 100,
    inflight: Annotated[int, typer.Option(help="Group flood: the flooder's sends in flight.")] = 20,
    pairs: Annotated[int, typer.Option(help="Bystander 1:1 pairs.")] = 20,
    rate: Annotated[float, typer.Option(help="Bystanders' msgs/s in all.")] = 40.0,
    phase: Annotated[float, typer.Option(help="Seconds measured quiet, then under attack.")] = 5.0,
    guessers: Annotated[int, typer.Option(help="Login brute force: concurrent guessers.")] = 32,
    upload_mib: Annotated[int, typer.Option(help="Login brute force: upload size, MiB.")] = 4,
    *,
    target: Target,
    out: Path,
) -> None:
    """What one abuser does to everyone else: bystanders' latency during a group flood, an
    upload during a login brute force (server with default limits and real argon2 cost)."""
    target = _single_node(target, "abuse")
    if target.url is not None:  # the limits and the hashing cost are set on a spawned server
        raise typer.BadParameter("abuse spawns its own server; --url is not supported")
    target = dataclasses.replace(
        target,
        server_env=abuse.DEFAULT_LIMITS_ENV | abuse.REAL_ARGON2_ENV | target.server_env,
    )
    p = abuse.Params(members, inflight, pairs, rate, phase, guessers, upload_mib)

    async def runner(handle: ServerHandle, client_cpu: int | None) -> dict[str, Any]:
        return await abuse.run(handle, p)

    _execute("abuse", target, out, runner, abuse.summary)


@bench_app.command("capacity")
def capacity_cmd(
    store: Annotated[
        capacity.Backend,
        typer.Option(
            help="The store the nodes share (with Redis bus and presence; sqlite: one node)."
        ),
    ] = capacity.Backend.postgres,
    nodes: Annotated[str, typer.Option(help="Node counts, comma-separated.")] = "1,2,4",
    rate: Annotated[float, typer.Option(help="1:1 messages per second offered.")] = 200.0,
    group_rate: Annotated[float, typer.Option(help="Group messages per second offered.")] = 4.0,
    pairs: Annotated[int, typer.Option(min=1, help="1:1 sender/receiver pairs.")] = 50,
    members: Annotated[int, typer.Option(min=0, help="Members of the group (0: none).")] = 100,
    duration: Annotated[float, typer.Option(help="Measured seconds per workload.")] = 15.0,
    warmup: Annotated[float, typer.Option(help="Seconds of load before each measure.")] = 3.0,
    idle: Annotated[float, typer.Option(help="Seconds of the idle measure.")] = 5.0,
    size: Annotated[int, typer.Option(help="Message body size in bytes.")] = 100,
    settle: Annotated[
        float, typer.Option(help="Seconds before reading PostgreSQL's statistics.")
    ] = 11.0,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a workload's last deliveries and acks.")
    ] = 30.0,
    redis_url: Annotated[
        str | None,
        typer.Option(help="Redis to use (default: a private redis-server of the run)."),
    ] = None,
    dynamodb_endpoint: Annotated[
        str | None,
        typer.Option(help="DynamoDB endpoint (default: a moto server spawned by the bench)."),
    ] = None,
    server_cpu: ServerCpu = None,
    client_cpu: ClientCpu = None,
    data_dir: DataDir = None,
    server_env: ServerEnv = None,
    out: Out = DEFAULT_OUT,
) -> None:
    """Cost per delivered message and per group message, for 1, 2, 4... nodes: CPU (nodes,
    PostgreSQL, Redis), store operations, Redis commands and bytes, client wire bytes."""
    try:
        counts = capacity.parse_nodes(nodes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if store is capacity.Backend.sqlite and counts != [1]:
        raise typer.BadParameter("SQLite serves one node: --nodes 1")
    env = {}
    for item in server_env or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--server-env wants KEY=VALUE, got {item!r}")
        env[key] = value
    p = capacity.Params(
        store=store,
        nodes=counts,
        rate=rate,
        group_rate=group_rate,
        pairs=pairs,
        members=members,
        duration=duration,
        warmup=warmup,
        idle=idle,
        size=size,
        settle=settle,
        drain_timeout=drain_timeout,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        data_dir=data_dir,
        server_env=env,
        redis_url=redis_url,
        dynamodb_endpoint=dynamodb_endpoint,
    )
    doc = run_loop(capacity.run(p))
    path = write_result(out, doc)
    for line in capacity.table(doc):
        print(line)
    for problem in doc["problems"]:
        print(f"PROBLEM: {problem}")
    print(f"result file {path}")
