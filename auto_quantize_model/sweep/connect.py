"""Which Ray the driver joins, checked with a deadline before ``ray.init`` ever sees the address.

``ray.init(address=...)`` retries a cluster that does not answer for minutes (20 attempts of up to 30 s each in
Ray 2.60), and a plain ``ray.init()`` joins the head that ``ray start`` recorded in
``$RAY_TMPDIR/ray/ray_current_cluster`` even after that head died without ``ray stop``. So every address is first
asked for its cluster id over gRPC (the call ``ray.init`` makes first: ``NodeInfoGcsService.GetClusterId``) with a
deadline (``AUTOQUANT_RAY_CONNECT_TIMEOUT`` seconds, default 15). The answer tells the cases apart in one call:

- an id: a live Ray head; joined (with the local token when the head demands one, as Ray does for ``auto``);
- refused, no answer, or a server that is no Ray head (the dashboard's HTTP port, another gRPC service): refused
  in one line naming the address, where it came from and the fix;
- "unauthenticated": token auth is on and this client has no token or the wrong one: one line saying where the
  token must come from.

A plain sweep (no ``--address``, no RAY_ADDRESS) whose recorded local head is dead starts its own local Ray, as it
does when there is no cluster at all, and says once how to clear the stale record (``ray stop``): the user asked
for no cluster, so refusing would only add a command to type.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from auto_quantize_model.errors import UserError

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_ENV = "AUTOQUANT_RAY_CONNECT_TIMEOUT"  # seconds; tests set it short
DEFAULT_CONNECT_TIMEOUT_S = 15.0
# Ray 2.60's budget of GCS connection attempts in ray.init (ray/_private/node.py, _init_gcs_client): bounded here
# too, in case the head goes away between our check and Ray's own connection.
_RAY_GCS_RETRIES_ENV = "RAY_gcs_server_port_wait_time_s"


def connect_timeout() -> float:
    """Seconds any one Ray connection may take (``AUTOQUANT_RAY_CONNECT_TIMEOUT``, default 15)."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{CONNECT_TIMEOUT_ENV}={raw!r} must be a positive number of seconds; unset it for the "
                        f"default {DEFAULT_CONNECT_TIMEOUT_S:g}")
    return value


@dataclass(frozen=True)
class Target:
    """The Ray a command uses: ``address`` (a live head's GCS, checked) to join, or None to start a local Ray."""

    address: str | None
    source: str  # where the address came from, for messages: "--address", "RAY_ADDRESS", the record file
    token: bool = False  # the head demands token auth and the local token works: join in token mode


def _token_source() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


def _local_token() -> str | None:
    """The token Ray would send in token mode (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    if (os.environ.get("RAY_AUTH_MODE") or "").lower() == "disabled":
        return None  # the user turned token auth off for this client
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    try:
        return loader.get_raw_token(ignore_auth_mode=True) or None
    except Exception as exc:  # noqa: BLE001 - Ray raises its AuthenticationError for an unreadable token file
        raise UserError(f"the Ray auth token at {_token_source()} is unreadable ({exc}); fix or remove it") from exc


def _ask_cluster_id(address: str, timeout: float, token: str | None) -> tuple[str, str]:
    """``("ok", id)`` or ``(grpc status name, details)`` for ``GetClusterId`` at ``address`` within ``timeout``."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            reply = stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code().name, (exc.details() or "").strip()
    return "ok", reply.cluster_id.hex()


def check_head(address: str, source: str, shown: str | None = None) -> Target:
    """The live Ray head at ``address``, or a one-line :class:`UserError` saying why it is none and what to do.
    ``shown``: the address as the user gave it (``127.0.0.1:6379``, ``auto``), for messages."""
    timeout = connect_timeout()
    where = f"{shown} ({source}: {address})" if shown and shown != address else f"{address} ({source})"
    status, detail = _ask_cluster_id(address, timeout, None)
    token = None
    if status == "UNAUTHENTICATED":
        token = _local_token()
        if token is None and (os.environ.get("RAY_AUTH_MODE") or "").lower() == "disabled":
            raise UserError(f"the Ray cluster at {where} requires token auth, but RAY_AUTH_MODE=disabled here: unset "
                            "it (the token is then read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        if token is None:
            raise UserError(f"the Ray cluster at {where} requires token auth and this machine has no "
                            "token: copy the head's ~/.ray/auth_token here (or set RAY_AUTH_TOKEN_PATH or "
                            "RAY_AUTH_TOKEN)")
        status, detail = _ask_cluster_id(address, timeout, token)
        if status == "UNAUTHENTICATED":
            raise UserError(f"the Ray cluster at {where} refused the auth token from "
                            f"{_token_source()}: copy the head's ~/.ray/auth_token here (or set RAY_AUTH_TOKEN_PATH "
                            "or RAY_AUTH_TOKEN)")
    if status == "ok":
        return Target(address, source, token=token is not None)
    fix = ("start one with `ray start --head` or pass the address `ray start` printed (--address HOST:PORT or "
           "RAY_ADDRESS)")
    if status == "DEADLINE_EXCEEDED":
        why = f"no answer within {timeout:g} s"
    elif "refused" in detail.lower():
        why = "connection refused"
    elif status == "UNIMPLEMENTED" or "http" in detail.lower():
        why = "something answers there, but it is not a Ray head's GCS port (the dashboard is 8265, the GCS 6379)"
    else:
        why = detail.splitlines()[0].rsplit(": ", 1)[-1][:160] if detail else status  # gRPC's last reason
    raise UserError(f"no Ray cluster at {where}: {why}; {fix}")


def _canonical(address: str, source: str) -> str:
    """``host:port`` as ``ray.init`` would connect to it (``auto``: the local head or RAY_ADDRESS, as in Ray)."""
    from ray._private import services

    if address.startswith(("http://", "https://")):
        raise UserError(f"{address} ({source}) is an HTTP address (the dashboard or job API); pass the Ray head's GCS "
                        "address instead (HOST:6379, as `ray start --head` prints it)")
    if address.startswith("ray://"):
        raise UserError(f"{address} ({source}) is a Ray Client address, which sweeps do not use; run the command on "
                        "a node of the cluster and pass the GCS address (HOST:6379)")
    try:
        resolved = services.canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"no Ray cluster found for --address {address} ({source}): {first}; start one with "
                        "`ray start --head` or pass HOST:PORT") from exc
    if resolved is None:  # "local"
        raise UserError(f"--address {address} ({source}) names no running cluster; drop it to start a local Ray")
    return resolved


def given_address(address: str | None) -> str | None:
    """The cluster address the user gave: ``address`` (``--address``), else RAY_ADDRESS; None: none given."""
    return address or os.environ.get("RAY_ADDRESS") or None


def resolve_target(address: str | None, needs_cluster: str | None = None) -> Target:
    """Where to run: ``address`` (``--address``), else RAY_ADDRESS, else the head ``ray start`` recorded on this
    machine, else a local Ray. Every address is checked with a deadline (:func:`check_head`).

    ``needs_cluster``: the command needs a running cluster (kept workers, release-workers); without an address it
    is refused with this text as the fix.
    """
    source = "--address" if address else "RAY_ADDRESS"
    address = given_address(address)
    if address:
        return check_head(_canonical(address, source), source, shown=address)
    if needs_cluster:
        raise UserError(needs_cluster)
    return _recorded_head()


def _recorded_head() -> Target:
    """The live head ``ray start`` recorded on this machine (``ray.init()`` joins it), else a local Ray; a dead
    head's record is named once, with the command that clears it."""
    from ray._common.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    try:
        recorded = record.read_text().strip()
    except OSError:
        return Target(None, "local")
    if not recorded:
        return Target(None, "local")
    try:
        return check_head(recorded, f"recorded by `ray start` in {record}")
    except UserError as exc:
        if "token" in str(exc):
            raise  # a live head that refuses us: joining a new local Ray instead would hide that
        log.warning("the Ray head that `ray start` recorded in %s (%s) is gone (it stopped without `ray stop`); "
                    "starting a local Ray for this run (`ray stop` clears the stale record)", record, recorded)
        return Target(None, "local")


def connect(target: Target, namespace: str, runtime_env: dict | None = None, log_to_driver: bool = True) -> bool:
    """``ray.init`` for ``target`` (nothing if Ray is initialized already). Returns True if it started a local Ray
    (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if target.address is None:
        # "local": never the head recorded by `ray start` (checked dead, or none). This Ray lives as long as the run
        # and nobody browses it: no dashboard web UI (Ray still starts its usage-stats part), less to start.
        ray.init(address="local", namespace=namespace, runtime_env=runtime_env, include_dashboard=False)
        return True
    if target.token and os.environ.get("RAY_AUTH_MODE") is None:
        # What ray.init does on its own for "auto" when a token exists (an explicit address never turns token mode
        # on in Ray 2.60: ray/_private/worker.py, init); this private helper is the part that does not log a warning.
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()
        log.info("joining %s in token-auth mode (token from %s)", target.address, _token_source())
    retries_set = _RAY_GCS_RETRIES_ENV in os.environ
    if not retries_set:
        os.environ[_RAY_GCS_RETRIES_ENV] = str(max(1, round(connect_timeout())))
    try:
        ray.init(address=target.address, namespace=namespace, runtime_env=runtime_env, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError) as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"could not join the Ray cluster at {target.address} ({target.source}): {last[:200]}; check "
                        "that the head is running (`ray status`)") from exc
    finally:
        if not retries_set:
            os.environ.pop(_RAY_GCS_RETRIES_ENV, None)
    return False
