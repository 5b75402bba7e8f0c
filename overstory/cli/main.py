"""The ``overstory`` command: ``demo`` and ``chat``; ``serve``, ``status``, ``health``,
``rebalance``; ``rollout``, ``promote``, ``rollback``; ``migrate``; ``keys``; ``backup``
and ``restore`` (:mod:`.backup`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..agent import DEFAULT_PLACEMENT, PLACEMENTS
from ..config import DEFAULT_NAMESPACE, STORE_ENV, Config, load_config
from ..exceptions import ConfigError, OverstoryError, RuntimeFailure, TurnFailed, UsageError
from ..jobs import JOB_STATES
from ..messages import TurnEvent
from ..quota import UNSET
from ..registry.hosts import resize_hosts
from ..runtime import ops
from ..runtime.client import Runtime, connect
from ..store import run_on_store
from ..telemetry.logs import setup_logging
from . import backup, deploy
from .demo import demo_agent, run_demo

__all__ = ["APP_ENV", "main"]

#: The app ``overstory serve`` deploys when none is named (how ``cluster.yaml`` passes
#: the operator's app to the head's start command).
APP_ENV = "OVERSTORY_APP"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (keys of overstory.Config)")
    parser.add_argument("--store", help="store URL: sqlite:///path.db or mongodb://host/db")
    parser.add_argument("--namespace", help="Ray namespace of the app (default: overstory)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="start the Ray dashboard when a local Ray is started",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PROVIDER:MODEL[@BASE_URL]",
        help="a model of the chain, in fallback order; repeatable. Providers: offline, "
        "openai, anthropic, or an OpenAI-compatible server by base URL (e.g. "
        "openai:qwen2.5@http://127.0.0.1:8000/v1). Keys: OPENAI_API_KEY, ANTHROPIC_API_KEY. "
        "Default: offline:demo (no key, no network)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overstory", description="LLM agent conversations served on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulate users talking to their conversations")
    _common(demo)
    demo.add_argument("--users", type=_positive, default=10, help="simulated users (10)")
    demo.add_argument("--turns", type=_positive, default=3, help="turns per user (3)")
    demo.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default=DEFAULT_PLACEMENT,
        help="hosted: conversations as entities in a few host actors per node (default); "
        "dedicated: one Ray actor per conversation",
    )
    demo.add_argument(
        "--latency-ms", type=float, default=0.0, help="offline model latency per call in ms (0)"
    )
    demo.add_argument(
        "--chaos",
        type=float,
        default=0.0,
        metavar="RATE",
        help="SIGKILL a random process serving conversations (a host, or a dedicated "
        "conversation actor) RATE times a second",
    )
    demo.add_argument(
        "--max-live",
        type=_positive,
        metavar="K",
        help="cap on live conversations per host (hosted) or actors per node (dedicated); "
        "the least recently used idle ones are passivated",
    )
    demo.add_argument(
        "--idle-timeout", type=float, metavar="S", help="passivate conversations idle for S s"
    )
    demo.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object on the last line"
    )
    chat = sub.add_parser("chat", help="talk to one user's conversation")
    _common(chat)
    chat.add_argument("--user", required=True, help="the user id")
    chat.add_argument(
        "--agent",
        metavar="NAME",
        help="talk to the deployed agent NAME (`overstory serve MODULE:ATTR`) instead of "
        "serving the demo agent from this process",
    )
    _add_ops_commands(sub)
    return parser


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {raw!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("store", args.store),
            ("namespace", args.namespace),
            ("ray_address", args.address),
        )
        if v is not None
    }
    cap = getattr(args, "max_live", None)
    if cap is not None and getattr(args, "placement", "dedicated") == "hosted":
        # The same cap, where hosted conversations live: per host.
        overrides["hosted"] = {"max_live_per_host": cap}
    elif cap is not None:
        overrides["dedicated"] = {"max_live_per_node": cap}
    conversations: dict[str, Any] = {}
    if getattr(args, "idle_timeout", None) is not None:
        conversations["idle_timeout_s"] = args.idle_timeout
    if "dedicated" in overrides:
        # With a cap, activations queue for room: give a queued user time to get in.
        conversations["activation_timeout_s"] = 900.0
    if conversations:
        overrides["conversations"] = conversations
    if args.config is not None:
        return load_config(args.config, overrides)
    return Config.from_mapping(overrides, source="command line")


def _demo(args: argparse.Namespace) -> int:
    if args.latency_ms < 0:
        raise UsageError(f"--latency-ms must be >= 0, got {args.latency_ms}")
    if not 0 <= args.chaos <= 100:
        raise UsageError(f"--chaos must be a rate in [0, 100] kills per second, got {args.chaos}")
    config = _config(args)
    scratch = None
    # Config resolves a relative default store to an absolute path, which marks it as set:
    # decide from what the user gave instead.
    chosen = args.store or os.environ.get(STORE_ENV) or args.config is not None
    if not chosen:
        # No store chosen: a scratch database for this run, removed afterwards.
        scratch = tempfile.mkdtemp(prefix="overstory-demo-")
        config = config.model_copy(update={"store": f"sqlite:///{scratch}/demo.db"})
    try:
        agent = demo_agent(args.latency_ms / 1000, args.model, placement=args.placement)
        runtime = connect(
            agent,
            config=config,
            dashboard=args.dashboard,
            telemetry=True,
        )
        try:
            print(
                f"overstory demo: {args.users} users x {args.turns} turns, store {config.store}, "
                f"model {agent.model.name}"
                f"{' (local Ray started for this demo)' if runtime.started_ray else ''}",
                file=sys.stderr,
            )
            result = run_demo(runtime, users=args.users, turns=args.turns, chaos=args.chaos)
        finally:
            runtime.close()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = result.summary()
    print(
        f"turns completed {summary['turns_completed']}/{summary['turns_requested']}, "
        f"errors {summary['errors']}, tool calls {summary['tool_calls']}, "
        f"messages stored {summary['messages_stored']}, "
        f"p50 {summary['p50_turn_ms']} ms, p99 {summary['p99_turn_ms']} ms, "
        f"first token p50 {summary['p50_ttft_ms']} ms, p99 {summary['p99_ttft_ms']} ms, "
        f"wall {summary['wall_s']} s"
    )
    print(
        f"kills {summary['kills']}, restarts {summary['restarts']}, "
        f"activations {summary['activations']}, passivations {summary['passivations']}, "
        f"lost {summary['lost_messages']}, duplicated {summary['duplicate_messages']}"
    )
    for sample in summary["error_samples"]:
        print(f"  error: {sample}")
    if args.json:
        print(json.dumps(summary))
    failed = summary["errors"] or summary["lost_messages"] or summary["duplicate_messages"]
    return 1 if failed else 0


def _chat(args: argparse.Namespace) -> int:
    if args.agent is not None and args.model:
        raise UsageError("--model configures the demo agent; a deployed --agent has its own")
    agent = None if args.agent is not None else demo_agent(models=args.model)
    runtime: Runtime = connect(
        agent, config=_config(args), dashboard=args.dashboard, telemetry=True
    )
    try:
        conv = runtime.conversation(args.user, agent=args.agent)
        stored = conv.history()
        print(
            f"conversation of {args.user!r} with {conv.agent!r}: {len(stored)} stored messages. "
            "/history shows them, /quit (or end of input) leaves."
        )
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            if line.strip() in ("/quit", "/exit"):
                break
            if line.strip() == "/history":
                for m in conv.history():
                    print(f"  [{m.seq}] {m.kind}: {_render(m)}")
                continue
            if not line.strip():
                continue
            try:
                _print_streamed(conv.stream(line))
            except (UsageError, TurnFailed) as exc:
                print(f"error: {exc}")
    finally:
        runtime.close()
    return 0


def _print_streamed(events: Iterator[TurnEvent]) -> None:
    """A streamed turn as it happens: tool calls on lines of their own, then the reply
    word by word after ``assistant>``."""
    speaking = False
    for event in events:
        if event.type == "delta":
            if not speaking:
                print("assistant> ", end="")
                speaking = True
            print(event.text, end="", flush=True)
        elif event.type == "tool_result" and event.tool_call and event.tool_return:
            call, result = event.tool_call, event.tool_return
            arguments = json.dumps(call.arguments)
            print(f"  [{call.name}({arguments}) -> {result.content}]", flush=True)
        elif event.type == "restarted":
            print("\n  [the conversation restarted; the answer starts again]", flush=True)
            speaking = False
        elif event.type in ("failed", "incomplete"):
            print(("\n" if speaking else "") + f"error: {event.text}")
            return
    if speaking:
        print()


def _render(message: Any) -> str:
    if message.kind == "assistant" and message.tool_calls:
        calls = ", ".join(f"{c.name}({json.dumps(c.arguments)})" for c in message.tool_calls)
        return f"{message.content} [calls {calls}]".strip()
    return str(message.content)


# --- operator commands: serve (.deploy) / status / health (overstory.runtime.ops) ----------


def _add_ops_commands(sub: Any) -> None:
    def attach_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--address", help="running Ray cluster (default: RAY_ADDRESS, else 'auto')"
        )
        parser.add_argument("--namespace", help="Ray namespace of the app (default: overstory)")

    serve = sub.add_parser(
        "serve",
        help="deploy an app (MODULE:ATTR) to a running cluster, booting the supervision "
        "tree once; without an app, boot the tree (echo agent) or attach to it",
    )
    serve.add_argument(
        "app",
        nargs="?",
        default=os.environ.get(APP_ENV) or None,
        metavar="MODULE:ATTR",
        help="the app: ATTR names an overstory.Agent, a list of agents or an overstory.App; "
        "every host imports MODULE itself (installed, on PYTHONPATH, or from --working-dir). "
        f"Default: ${APP_ENV}",
    )
    serve.add_argument(
        "--working-dir",
        metavar="DIR",
        help="ship DIR to the cluster as the hosts' Ray runtime_env working_dir",
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        type=_host_port,
        help="also deploy the HTTP front door (OpenAI-shaped API, Ray Serve) on HOST:PORT",
    )
    serve.add_argument(
        "--replicas", type=_positive, metavar="N", help="the door's replicas (default 1)"
    )
    serve.add_argument(
        "--min-replicas",
        type=_positive,
        metavar="N",
        help="autoscale the door (Ray Serve): at least N replicas",
    )
    serve.add_argument("--max-replicas", type=_positive, metavar="N", help="... at most N replicas")
    serve.add_argument(
        "--target-ongoing-requests",
        type=_positive,
        metavar="R",
        help="... aiming at R open requests per replica (an open stream is one; default 500)",
    )
    serve.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="serve HTTPS: the certificate chain"
    )
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="... and its private key")
    serve.add_argument(
        "--plain-http",
        action="store_true",
        help="serve plain HTTP on an address other machines reach (e.g. behind a TLS "
        "load balancer); loopback needs no flag",
    )
    serve.add_argument("--jwt-issuer", metavar="ISS", help="accept JWTs from this issuer")
    serve.add_argument("--jwt-audience", metavar="AUD", help="... for this audience")
    serve.add_argument("--jwt-public-key", type=Path, metavar="PEM", help="... signed by this key")
    serve.add_argument("--jwt-jwks-url", metavar="URL", help="... or by a key of this JWKS")
    serve.add_argument(
        "--jwt-algorithm", action="append", metavar="ALG", help="allowed (default RS256)"
    )
    serve.add_argument("--jwt-admin-claim", metavar="CLAIM", help="boolean claim: an admin")
    serve.add_argument("--json", action="store_true", help="one JSON object on stdout")
    attach_args(serve)
    serve.add_argument("--config", type=Path, help="TOML config file (keys of overstory.Config)")
    serve.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
    serve.add_argument("--max-live", type=_positive, metavar="K", help="live actors per node")
    serve.add_argument("--idle-timeout", type=float, metavar="S", help="passivate after S s idle")
    rebalance = sub.add_parser(
        "rebalance",
        help="hosted placement: resize the hosts to what the cluster holds now, or to N "
        "(online; the tree also follows nodes joining and leaving by itself)",
    )
    attach_args(rebalance)
    rebalance.add_argument(
        "--hosts",
        type=_positive,
        metavar="N",
        help="serve with N hosts, more or fewer (default: per node)",
    )
    rebalance.add_argument("--json", action="store_true", help="one JSON object on stdout")
    rollout = sub.add_parser(
        "rollout", help="give VERSION of agent NAME to P %% of new conversations (sticky)"
    )
    rollout.add_argument("name", metavar="NAME")
    rollout.add_argument("version", metavar="VERSION")
    rollout.add_argument(
        "--percent", type=float, required=True, metavar="P", help="share of new conversations"
    )
    promote = sub.add_parser(
        "promote", help="make VERSION of agent NAME live for everyone from their next turn"
    )
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    rollback = sub.add_parser(
        "rollback", help="agent NAME back to its previously promoted version, for everyone"
    )
    rollback.add_argument("name", metavar="NAME")
    audit = sub.add_parser(
        "audit",
        help="the audit trail (authentication, denials, quota refusals, keys, shares, "
        "rollouts): list it, or --verify its hash chain",
    )
    audit.add_argument("--user", metavar="U", help="only records of this user")
    audit.add_argument(
        "--since", type=_moment, metavar="T", help="only records from T (ISO 8601, or epoch s)"
    )
    audit.add_argument("--verify", action="store_true", help="check the chain; exit 1 if broken")
    audit.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
    audit.add_argument("--config", type=Path, help="TOML config file (its store)")
    audit.add_argument("--json", action="store_true", help="JSON on stdout")
    vault = sub.add_parser("vault", help="inspect and clear an agent's DataVault (the store only)")
    vault_sub = vault.add_subparsers(dest="vault_command", required=True)
    vault_ls = vault_sub.add_parser("ls", help="AGENT's collections, or one collection's keys")
    vault_ls.add_argument("agent", metavar="AGENT")
    vault_ls.add_argument("collection", metavar="COLLECTION", nargs="?")
    vault_get = vault_sub.add_parser("get", help="one document")
    vault_get.add_argument("agent", metavar="AGENT")
    vault_get.add_argument("collection", metavar="COLLECTION")
    vault_get.add_argument("key", metavar="KEY")
    vault_rm = vault_sub.add_parser("rm", help="delete one document, or a whole collection")
    vault_rm.add_argument("agent", metavar="AGENT")
    vault_rm.add_argument("collection", metavar="COLLECTION")
    vault_rm.add_argument("key", metavar="KEY", nargs="?")
    for cmd in (vault_ls, vault_get, vault_rm):
        cmd.add_argument("--user", metavar="U", help="whose (default: the shared collections)")
        cmd.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
        cmd.add_argument("--config", type=Path, help="TOML config file (its store)")
        cmd.add_argument("--json", action="store_true", help="JSON on stdout")
    usage = sub.add_parser(
        "usage", help="turns, tool calls, tokens and cost per model and user (from the store)"
    )
    usage.add_argument("--user", metavar="U", help="only this user's conversations")
    usage.add_argument(
        "--since", type=_moment, metavar="T", help="only from T (ISO 8601, or epoch s)"
    )
    usage.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
    usage.add_argument("--config", type=Path, help="TOML config file (store, prices)")
    usage.add_argument("--json", action="store_true", help="one JSON object on stdout")
    jobs = sub.add_parser(
        "jobs", help="background jobs (rt.jobs.submit): newest first, or one with its result"
    )
    jobs.add_argument("job_id", metavar="JOB_ID", nargs="?", help="show this job only")
    jobs.add_argument("--user", metavar="U", help="only this user's jobs")
    jobs.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    jobs.add_argument("--limit", type=int, default=50, metavar="N", help="at most N (50)")
    jobs.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
    jobs.add_argument("--config", type=Path, help="TOML config file (store, namespace)")
    jobs.add_argument("--namespace", help="the app's namespace (default: the config's)")
    jobs.add_argument("--json", action="store_true", help="JSON on stdout")
    quota = sub.add_parser(
        "quota", help="per-user quotas: set a user's limits, show them and today's usage"
    )
    quota_sub = quota.add_subparsers(dest="quota_command", required=True)
    quota_set = quota_sub.add_parser(
        "set", help="change USER's limits (those not given keep their value; 'none': no limit)"
    )
    quota_show = quota_sub.add_parser("show", help="USER's limits and where they stand today")
    for cmd in (quota_set, quota_show):
        cmd.add_argument("user", metavar="USER")
        cmd.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
        cmd.add_argument("--namespace", help="the tree's namespace (default: overstory)")
        cmd.add_argument("--config", type=Path, help="TOML config file (store, defaults)")
        cmd.add_argument("--json", action="store_true", help="one JSON object on stdout")
    for flag in ("--tokens-per-day", "--requests-per-minute", "--concurrent-turns"):
        quota_set.add_argument(flag, type=_limit, metavar="N|none", default=UNSET)
    migrate = sub.add_parser(
        "migrate",
        help="copy histories stored before apps (keyed by user id alone) to each user's "
        "conversation with agent NAME; the store only, no cluster",
    )
    migrate.add_argument("--agent", required=True, metavar="NAME")
    migrate.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
    migrate.add_argument("--config", type=Path, help="TOML config file (its store)")
    migrate.add_argument("--dry-run", action="store_true", help="report, copy nothing")
    migrate.add_argument("--json", action="store_true", help="one JSON object on stdout")
    backup.add_commands(sub)
    keys = sub.add_parser(
        "keys",
        help="API keys of the HTTP front door (create, list, revoke) and the data keys of "
        "encryption at rest (rotate-data); the store only",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key for USER and print it once")
    create.add_argument("--user", required=True, metavar="ID", help="the user the key speaks for")
    create.add_argument("--admin", action="store_true", help="the key reaches every conversation")
    listing = keys_sub.add_parser("list", help="every key's id, user, role and state (no secret)")
    revoke = keys_sub.add_parser("revoke", help="refuse key KEY_ID from now on")
    revoke.add_argument("key_id", metavar="KEY_ID")
    rotate = keys_sub.add_parser(
        "rotate-data",
        help="seal every message body with the first of OVERSTORY_DATA_KEYS (plain ones, and "
        "those under an older key); safe while the store serves",
    )
    for cmd in (create, listing, revoke, rotate):
        cmd.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
        cmd.add_argument("--config", type=Path, help="TOML config file (its store)")
        cmd.add_argument("--json", action="store_true", help="JSON on stdout")
    for cmd in (rollout, promote, rollback):
        attach_args(cmd)
        cmd.add_argument("--store", help="the tree's store, if the tree cannot name it")
        cmd.add_argument("--json", action="store_true", help="one JSON object on stdout")
    for name, helptext in (
        ("status", "live conversations, supervisor counters, tree and store state"),
        ("health", "exit 0 when the tree is alive and the store answers (liveness probe)"),
    ):
        cmd = sub.add_parser(name, help=helptext)
        attach_args(cmd)
        cmd.add_argument("--store", help="store to check if the tree cannot name its own")
        cmd.add_argument(
            "--timeout", type=float, default=10.0, metavar="S", help="per-check deadline (10)"
        )
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _probe(args: argparse.Namespace) -> ops.Probe:
    namespace = args.namespace or DEFAULT_NAMESPACE
    ops.attach_existing(args.address, namespace)
    return ops.Probe(namespace, timeout_s=args.timeout, fallback_store=args.store)


def _jwt(args: argparse.Namespace) -> Any:
    """JWT settings from the ``--jwt-*`` options (None: API keys only)."""
    from ..gateway.tokens import JwtSettings

    if args.jwt_issuer is None and args.jwt_audience is None:
        return None
    key = None
    if args.jwt_public_key is not None:
        try:
            key = args.jwt_public_key.read_text()
        except OSError as exc:
            raise ConfigError(
                f"--jwt-public-key: cannot read {args.jwt_public_key}: {exc}"
            ) from exc
    return JwtSettings(
        issuer=args.jwt_issuer or "",
        audience=args.jwt_audience or "",
        public_key=key,
        jwks_url=args.jwt_jwks_url,
        algorithms=tuple(args.jwt_algorithm or ("RS256",)),
        admin_claim=args.jwt_admin_claim,
    )


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 0.0.0.0:8000), got {value!r}")
    return host, int(port)


def _door_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """``serve_http``'s ``replicas`` or ``autoscaling`` from the options; a mix, or
    either without ``--http``, is refused by name."""
    from ..gateway.serve import autoscaling_config

    auto = {
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests,
    }
    asked = [f"--{k.replace('_', '-')}" for k, v in auto.items() if v is not None]
    if args.replicas is not None:
        asked.insert(0, "--replicas")
    if asked and args.http is None:
        raise UsageError(f"{', '.join(asked)}: the door's replicas need --http")
    if args.replicas is not None and len(asked) > 1:
        raise UsageError(
            f"--replicas is a fixed count: give it or {', '.join(asked[1:])}, not both"
        )
    if args.replicas is not None:
        return {"replicas": args.replicas}
    if asked:
        return {"autoscaling": autoscaling_config(**auto)}
    return {}


def _door_tls(args: argparse.Namespace) -> Any:
    """``serve_http``'s ``tls`` from the options, or None for plain HTTP, which an
    address other machines reach gets only when ``--plain-http`` asks for it."""
    import ipaddress

    from ..gateway.serve import Tls

    given = [f for f, v in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)) if v]
    if args.http is None:
        if given or args.plain_http:
            named = ", ".join(given + (["--plain-http"] if args.plain_http else []))
            raise UsageError(f"{named}: the door's TLS settings need --http")
        return None
    if given and args.plain_http:
        raise UsageError(f"--plain-http serves without TLS: give it or {' and '.join(given)}")
    if len(given) == 1:
        missing = "--tls-key" if given == ["--tls-cert"] else "--tls-cert"
        raise UsageError(f"{given[0]} needs {missing} too")
    if given:
        tls = Tls(str(args.tls_cert), str(args.tls_key))
        tls.check()  # here, before anything is deployed
        return tls
    host = args.http[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not args.plain_http:
        raise UsageError(
            f"--http {host}:{args.http[1]} would serve plain HTTP where other machines reach "
            "it: give --tls-cert and --tls-key for HTTPS, or --plain-http to ask for plain "
            "HTTP (e.g. behind a load balancer that terminates TLS)"
        )
    return None


def _serve(args: argparse.Namespace) -> int:
    config = _config(args)
    jwt = _jwt(args)  # a bad option fails here, before anything is deployed
    scaling = _door_scaling(args)
    tls = _door_tls(args)
    result = deploy.serve(config, args.app, args.working_dir)
    if args.http is not None:
        from ..gateway.serve import serve_http
        from ..runtime.ops import store_of_tree

        store = store_of_tree(result["namespace"], config.store)
        result["http"] = serve_http(
            result["namespace"], store, *args.http, jwt=jwt, tls=tls, **scaling
        )
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    verb = "booted" if result["booted"] else "already running, attached to"
    print(
        f"overstory serve: {verb} the supervision tree in namespace {result['namespace']!r} "
        f"(root {result['root_actor_id']}, store {result['store']})"
    )
    app = result["app"]
    agents = ", ".join(f"{n} (versions {', '.join(v)})" for n, v in app["agents"].items())
    print(f"  app {app.get('source') or 'local'}: {agents}; default {app['default']!r}")
    if result.get("redeployed"):
        print(f"  hosts replaced to run the new code: {_flat(result['redeployed'])}")
    if result.get("http"):
        print(f"  HTTP front door at {result['http']}/v1 (OpenAI-shaped; keys: overstory keys)")
    for name, split in result.get("splits", {}).items():
        print(f"  {_split_line(name, split)}")
    return 0


def _split_line(name: str, split: dict[str, Any]) -> str:
    shares = ", ".join(f"{v}: {p:g}%" for v, p in split["new_conversations_percent"].items())
    previous = f", previous {split['previous']}" if split.get("previous") else ""
    return f"agent {name}: live {split['live']}{previous}; new conversations {shares}"


def _split_command(args: argparse.Namespace) -> int:
    from ..runtime.ops import store_of_tree
    from .deploy import change_split

    namespace = args.namespace or DEFAULT_NAMESPACE
    ops.attach_existing(args.address, namespace)
    config = Config.from_mapping(
        {"namespace": namespace, "store": store_of_tree(namespace, args.store)},
        source="command line",
    )
    if args.command == "rollout":
        split = change_split(
            config, "roll out", lambda rt: rt.rollouts.start(args.name, args.version, args.percent)
        )
    elif args.command == "promote":
        split = change_split(
            config, "promote", lambda rt: rt.rollouts.promote(args.name, args.version)
        )
    else:
        split = change_split(config, "roll back", lambda rt: rt.rollouts.rollback(args.name))
    if args.json:
        print(json.dumps(split, sort_keys=True))
    else:
        print(f"overstory {args.command}: {_split_line(args.name, split)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    report = ops.status(_probe(args))
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    for section, fields in report.items():
        print(f"{section}:")
        for key, value in fields.items():
            if isinstance(value, list):
                print(f"  {key}:" + ("" if value else " -"))
                for item in value:
                    print(f"    - {_flat(item)}")
                continue
            print(f"  {key}: {_flat(value)}")
    return 0


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_flat(v)}" for k, v in value.items()) or "-"
    return str(value)


def _health(args: argparse.Namespace) -> int:
    try:
        found = ops.health(_probe(args))
    except RuntimeFailure as exc:
        print(f"unhealthy: {exc}")
        return 1
    for problem in found:
        print(f"unhealthy: {problem}")
    if not found:
        print(
            "healthy: the supervisors of the tree answer, the app imports, the store answers, "
            "a model of the chain can answer"
        )
    return 1 if found else 0


def _rebalance(args: argparse.Namespace) -> int:
    namespace = args.namespace or DEFAULT_NAMESPACE
    ops.attach_existing(args.address, namespace)
    table = resize_hosts(namespace, args.hosts, timeout_s=120.0)
    if args.json:
        print(json.dumps(table, sort_keys=True))
    else:
        print(
            f"overstory rebalance: namespace {namespace!r} is served by {len(table['hosts'])} "
            f"hosts (shard table version {table['version']}, {table['shards']} shards)"
        )
    return 0


def _store_config(args: argparse.Namespace) -> Config:
    """The config of a command that only needs a store (``--config``, ``--store``)."""
    if args.config is not None:
        return load_config(args.config, {"store": args.store} if args.store else None)
    return Config.from_mapping({"store": args.store} if args.store else {}, source="command line")


def _moment(text: str) -> float:
    """A point in time on the command line: ISO 8601 (UTC unless it says) or epoch s."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"an ISO 8601 time (2026-11-30T12:00) or epoch seconds, not {text!r}"
        ) from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _audit(args: argparse.Namespace) -> int:
    from ..audit import records, verify

    url = _store_config(args).store
    if args.verify:
        problems = run_on_store(url, verify)
        chain = run_on_store(url, records)
        if args.json:
            print(json.dumps({"intact": not problems, "records": len(chain), "problems": problems}))
        elif problems:
            print(f"overstory audit: the chain of {len(chain)} record(s) is BROKEN:")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"overstory audit: the chain of {len(chain)} record(s) is intact")
        return 1 if problems else 0
    chosen = [
        r
        for r in run_on_store(url, records)
        if (args.user is None or r.who == args.user) and (args.since is None or r.at >= args.since)
    ]
    if args.json:
        print(json.dumps([asdict(r) for r in chosen], sort_keys=True))
        return 0
    for r in chosen:
        when = datetime.fromtimestamp(r.at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        detail = " ".join(f"{k}={v}" for k, v in sorted(r.detail.items()))
        print(f"{r.seq:>6}  {when}  {r.who:<16} {r.action:<16} {r.outcome:<8} {r.target}  {detail}")
    if not chosen:
        print("no audit records")
    return 0


def _vault(args: argparse.Namespace) -> int:
    from .. import vault
    from ..validation import validate_user_id

    url = _store_config(args).store
    user = "" if args.user is None else validate_user_id(args.user)
    if args.vault_command == "get":
        document = run_on_store(
            url, lambda st: vault.fetch(st, args.agent, user, args.collection, args.key)
        )
        if document is None:
            print(
                f"overstory vault: no document {args.key!r} in {args.collection!r}", file=sys.stderr
            )
            return 1
        print(json.dumps(document, ensure_ascii=False, sort_keys=True))
        return 0
    if args.vault_command == "rm":
        gone = run_on_store(
            url, lambda st: vault.clear(st, args.agent, user, args.collection, args.key)
        )
        print(json.dumps({"deleted": gone}) if args.json else f"overstory vault: {gone} deleted")
        return 0
    if args.collection is not None:
        listed: Any = run_on_store(
            url, lambda st: vault.keys(st, args.agent, user, args.collection)
        )
    else:
        listed = run_on_store(
            url, lambda st: vault.listing(st, args.agent, None if args.user is None else user)
        )
    if args.json:
        print(json.dumps(listed, sort_keys=True))
    elif args.collection is not None:
        print("\n".join(listed) or "no documents")
    else:
        for row in listed:
            owner = row["owner"] or "(shared)"
            print(f"{owner:<24} {row['collection']:<24} {row['documents']}")
        if not listed:
            print("no vault documents")
    return 0


def _usage(args: argparse.Namespace) -> int:
    from ..usage import usage
    from ..validation import validate_user_id

    config = _store_config(args)
    user = None if args.user is None else validate_user_id(args.user)
    counted = run_on_store(
        config.store, lambda st: usage(st, config.usage.prices, user=user, since=args.since)
    )
    if args.json:
        print(json.dumps(counted, sort_keys=True))
        return 0
    print(
        f"{counted['turns']} turn(s), {counted['tool_calls']} tool call(s), "
        f"{counted['input_tokens']} input and {counted['output_tokens']} output tokens, "
        f"${counted['cost_usd']:.4f}"
        + (f" ({counted['unpriced']} tokens of unpriced models)" if counted["unpriced"] else "")
    )
    for model, row in sorted(counted["models"].items()):
        price = f"${row['cost_usd']:.4f}" if row["priced"] else "no price"
        print(
            f"  {model or '(none)':<32} {row['input_tokens']:>10} in {row['output_tokens']:>10} out  {price}"
        )
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from ..jobs import JobBook
    from ..validation import validate_user_id

    config = _store_config(args)
    namespace = args.namespace or config.namespace
    if args.job_id is not None:
        one = run_on_store(config.store, lambda st: JobBook(st, namespace).status(args.job_id))
        shown = one.public()
        if args.json:
            print(json.dumps(shown, sort_keys=True))
        else:
            for key in sorted(shown):
                print(f"{key:<16} {shown[key]}")
        return 0
    if not 1 <= args.limit <= 10_000:
        raise ConfigError(f"--limit must be 1..10000, got {args.limit}")
    user = None if args.user is None else validate_user_id(args.user)
    listed = run_on_store(
        config.store,
        lambda st: JobBook(st, namespace).listing(user=user, state=args.state, limit=args.limit),
    )
    if args.json:
        print(json.dumps([job.public() for job in listed], sort_keys=True))
        return 0
    for job in listed:
        created = datetime.fromtimestamp(job.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        why = job.error if job.state != "succeeded" else ""
        print(
            f"{job.id}  {job.state:<9} {job.attempts}/{job.max_attempts}  {created}  "
            f"{job.user[:24]:<24} {job.agent[:16]:<16} {why[:60]}".rstrip()
        )
    if not listed:
        print("no jobs")
    return 0


def _limit(text: str) -> int | None:
    """A quota limit on the command line: a whole number >= 0, or ``none``."""
    if text.lower() == "none":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number >= 0 or 'none', not {text!r}")
    return int(text)


def _quota(args: argparse.Namespace) -> int:
    from ..quota import change_quota, report
    from ..validation import validate_user_id

    overrides = {"namespace": args.namespace} if args.namespace else {}
    if args.config is not None:
        config = load_config(
            args.config, {**({"store": args.store} if args.store else {}), **overrides}
        )
    else:
        config = Config.from_mapping(
            {**({"store": args.store} if args.store else {}), **overrides}, source="command line"
        )
    user = validate_user_id(args.user, max_chars=config.limits.max_user_id_chars)
    default = config.quotas.quota()
    ns = config.namespace
    if args.quota_command == "set":
        changes = {
            name: getattr(args, name)
            for name in ("tokens_per_day", "requests_per_minute", "concurrent_turns")
            if getattr(args, name) is not UNSET
        }
        if not changes:
            raise ConfigError(
                "quota set: give at least one of --tokens-per-day, --requests-per-minute, "
                "--concurrent-turns"
            )
        run_on_store(config.store, lambda st: change_quota(st, ns, user, default, changes))
    shown = run_on_store(config.store, lambda st: report(st, ns, user, default))
    if args.json:
        print(json.dumps(shown, sort_keys=True))
        return 0
    limits = ", ".join(
        f"{k.replace('_', ' ')} {'unlimited' if v is None else v}"
        for k, v in shown["quota"].items()
    )
    usage = shown["usage"]
    print(f"{user}: {limits} ({'their own' if shown['own'] else 'the default'})")
    print(
        f"  today ({usage['day'] or 'no use yet'}): {usage['tokens']} tokens used, "
        f"{usage['reserved_tokens']} reserved; {usage['running_turns']} turn(s) running, "
        f"{usage['turns_last_minute']} started in the last minute"
    )
    return 0


def _keys(args: argparse.Namespace) -> int:
    from ..gateway.keys import create_key, list_keys, revoke_key

    url = _store_config(args).store
    if args.keys_command == "rotate-data":
        # The owners of sealed records register their re-sealers at import: this
        # command, above them all, imports each one and requires its re-sealer.
        from .. import jobs, vault
        from ..store import base
        from ..store.crypto import reseal

        owners = {"messages": base, "vault": vault, "jobs": jobs}
        counts = run_on_store(url, lambda store: reseal(store, require=owners))
        if args.json:
            print(json.dumps(counts, sort_keys=True))
        else:
            print(
                f"overstory keys rotate-data: {counts['resealed']} of {counts['examined']} "
                f"message(s) re-sealed with data key {counts['key']!r}"
                + (
                    f"; {counts['skipped']} changed meanwhile, run it again"
                    if counts["skipped"]
                    else ""
                )
            )
        return 0
    if args.keys_command == "create":
        key, record = run_on_store(url, lambda s: create_key(s, args.user, admin=args.admin))
        if args.json:
            print(json.dumps({"key": key, "key_id": record.key_id, "user": record.user}))
        else:
            role = "admin" if record.admin else "user"
            print(f"API key {record.key_id} for {role} {record.user!r} (shown once, keep it):")
            print(key)
        return 0
    if args.keys_command == "revoke":
        record = run_on_store(url, lambda s: revoke_key(s, args.key_id))
        if args.json:
            print(json.dumps(record.public(), sort_keys=True))
        else:
            print(f"overstory keys: key {record.key_id} of {record.user!r} is revoked")
        return 0
    records = run_on_store(url, list_keys)
    if args.json:
        print(json.dumps([r.public() for r in records], sort_keys=True))
        return 0
    for r in records:
        state = "revoked" if r.revoked_at is not None else "active"
        role = "admin" if r.admin else "user"
        print(f"{r.key_id}  {state:7}  {role:5}  {r.user}")
    if not records:
        print("no API keys")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .deploy import adopt_histories

    config = _store_config(args)
    report = run_on_store(
        config.store, lambda s: adopt_histories(s, args.agent, dry_run=args.dry_run)
    )
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    verb = "would copy" if args.dry_run else "copied"
    print(
        f"overstory migrate: {verb} {len(report['copied'])} histories "
        f"({report['messages']} messages) to agent {args.agent!r}; "
        f"{len(report['already_there_or_in_use'])} already there or in use"
    )
    for cid in report["ambiguous_not_moved"]:
        print(f"  not moved, looks like an agent:user id already: {cid!r}")
    return 0


def _backup(args: argparse.Namespace) -> int:
    return backup.backup(args, _store_config(args).store)


_OPS = {
    "serve": _serve,
    "status": _status,
    "health": _health,
    "rebalance": _rebalance,
    "rollout": _split_command,
    "promote": _split_command,
    "rollback": _split_command,
    "migrate": _migrate,
    "backup": _backup,
    "restore": backup.restore,
    "keys": _keys,
    "quota": _quota,
    "audit": _audit,
    "usage": _usage,
    "vault": _vault,
    "jobs": _jobs,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        setup_logging()
        if args.command in _OPS:
            return _OPS[args.command](args)
        if args.command == "demo":
            return _demo(args)
        return _chat(args)
    except OverstoryError as exc:
        print(f"overstory {args.command}: error: {exc}", file=sys.stderr)
        # For the operator commands a failure (no cluster, store down) is 1, a mistake 2.
        return 1 if args.command in _OPS and isinstance(exc, RuntimeFailure) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
