"""`shardcompute coordinator`: load the config, then serve the coordinator app."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shardcompute.certs import check_server_files
from shardcompute.config import ClusterConfig, load_config, resolve_cluster_token
from shardcompute.errors import ShardComputeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardcompute coordinator",
        description="Run the coordinator: it forms the cluster and serves the OpenAI API.",
    )
    p.add_argument("--config", help="cluster config YAML (default: built-in defaults)")
    p.add_argument("--host", help="overrides coordinator.host")
    p.add_argument("--port", type=int, help="overrides coordinator.port")
    p.add_argument("--world-size", type=int, help="overrides parallelism.tensor_parallel_size")
    p.add_argument("--model", help="overrides model.name (the API's model id)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set coordinator.heartbeat_timeout_seconds=5",
    )
    p.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (security.tls_cert)")
    p.add_argument("--tls-key", help="the certificate's PEM private key (security.tls_key)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    return p


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """The config file, then env vars, then these flags."""
    overrides = {
        "coordinator.host": args.host,
        "coordinator.port": args.port,
        "parallelism.tensor_parallel_size": args.world_size,
        "model.name": args.model,
        "security.tls_cert": args.tls_cert,
        "security.tls_key": args.tls_key,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ShardComputeError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    return load_config(args.config, overrides)


def serve(config: ClusterConfig) -> None:
    """Run the coordinator in this process until interrupted."""
    security = config.security
    if security.tls_cert and security.tls_key:  # refuse bad files before uvicorn's traceback
        check_server_files(security.tls_cert, security.tls_key)
    import uvicorn

    from shardcompute.coordinator.app import create_app
    from shardcompute.coordinator.service import Coordinator

    token = resolve_cluster_token(security, create=True)
    host, port = config.coordinator.host, config.coordinator.port
    scheme = "https" if security.tls_cert else "http"
    url = f"{scheme}://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    app = create_app(Coordinator(config, token, coordinator_url=url))
    log = logging.getLogger("shardcompute.coordinator")
    log.info(
        "coordinator on %s (pid %d): waiting for %d workers, model %s, API key %s",
        url,
        os.getpid(),
        config.parallelism.tensor_parallel_size,
        config.model.name,
        "required" if security.api_key else "not required",
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=2,
        ssl_certfile=security.tls_cert,
        ssl_keyfile=security.tls_key,
    )


def coordinator_main(argv: list[str] | None = None) -> int:
    """Entry point of `shardcompute coordinator` and scripts/start_coordinator.py."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s coordinator %(levelname)s %(message)s"
    )
    try:
        serve(config_from_args(args))
    except ShardComputeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
