"""Item-sharded serving on Ray Serve (``sterling serve --engine ray --shards N --replicas R``;
``[ray]`` extra).

Deployments::

    shard-0 … shard-{N-1}   ShardDeployment × R replicas: a ShardSearcher over one shard snapshot
                            (its Bloom + int8 IVF index part and embedding cache)
    ingress                 the same FastAPI app as ``sterling serve`` (:func:`create_app`), whose
                            model is a ShardedModel: user tower once, fan-out to the shards,
                            merge_topk, OverArch + Value Model

The ingress calls the shards from its model thread through deployment handles (all shards first,
then the results), so a request's shard searches run in parallel. Every deployment asks Ray for no
CPU of its own: the tensors' thread pools share the machine's cores.

Hot reload (``POST /v1/admin/reload`` with another sharded snapshot of as many shards): the
ingress loads the new shard-0 weights, and every shard call names the shard snapshot it is for, so
the warm-up query has each shard load its new part beside the old one (a replica keeps two); the
ingress then switches between two batches, as the single-process server does, with the live updates
acknowledged meanwhile replayed onto the new shards. With ``--replicas`` above 1 the warm-up reaches
one replica of each shard; the others load the new part on their first call (a slow request each).
Limit: ``POST /v1/items`` needs ``--replicas 1`` (an update goes to one replica of its shard;
replicas of a shard would diverge).

Example::

    ray.init(num_cpus=2)
    app = build_app(ServerConfig(Path("runs/snap-sharded"), token="t"), replicas=1)
    serve.run(app, name="sterling", route_prefix="/")
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from sterling.serving.server import ServerConfig, create_app
from sterling.serving.shards import ShardedModel, ShardSearcher, shard_digests, shard_paths

__all__ = ["build_app", "run"]


def _deployments():
    """The deployment classes (Ray is imported only when the Ray engine is used)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class ShardDeployment:
        """One shard; a call names the shard snapshot it is for, loaded on first use (the current
        one and the one a reload brings in are kept, so a swap never waits on a load twice)."""

        def __init__(self, path: str, digest: str) -> None:
            self.searchers: OrderedDict[tuple[str, str], ShardSearcher] = OrderedDict()
            self.lock = threading.Lock()  # Serve runs sync methods on a thread pool
            self._searcher(path, digest)

        def _searcher(self, path: str, digest: str) -> ShardSearcher:
            key = (path, digest)
            with self.lock:
                searcher = self.searchers.get(key)
            if searcher is None:  # loaded outside the lock: calls for the serving snapshot go on meanwhile
                searcher = ShardSearcher.load(Path(path), digest)
            with self.lock:
                searcher = self.searchers.setdefault(key, searcher)
                self.searchers.move_to_end(key)
                while len(self.searchers) > 2:
                    self.searchers.popitem(last=False)
                return searcher

        def call(self, path: str, digest: str, method: str, *args):
            return getattr(self._searcher(path, digest), method)(*args)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class Ingress:
        async def __init__(self, config: ServerConfig, shards: list, replicas: int) -> None:
            self.config, self.shards, self.replicas = config, shards, replicas
            # off the event loop: loading waits on the shards, which Serve forbids on the loop
            self._app = await asyncio.to_thread(create_app, replace(config, loader=self._load))

        def _load(self, path: Path) -> ShardedModel:
            """The model of the sharded snapshot ``path``: its shard-0 weights here, and the shard
            deployments asked for ``path``'s shards (which they load on first use)."""
            paths, digests = shard_paths(path), shard_digests(path)
            if len(paths) != len(self.shards):
                raise ValueError(f"{path} has {len(paths)} shards, the app runs {len(self.shards)}")
            refuse = (
                None
                if self.replicas == 1
                else (
                    "live item updates need --replicas 1 with --engine ray (an update reaches one replica of its shard)"
                )
            )
            return ShardedModel(
                ShardSearcher.load(paths[0], digests[0]).model,
                [_caller(h, p, d) for h, p, d in zip(self.shards, paths, digests)],
                refuse,
            )

        def __serve_build_asgi_app__(self):
            return self._app

    return ShardDeployment, Ingress


def _caller(handle, path: Path, digest: str):
    def call(method: str, *args):
        return handle.call.remote(str(path), digest, method, *args)

    return call


def build_app(config: ServerConfig, replicas: int = 1):
    """The Ray Serve application of the sharded snapshot ``config.snapshot`` (``shards.json`` +
    ``shard-*``), ``replicas`` replicas per shard."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    ShardDeployment, Ingress = _deployments()
    shards = [
        ShardDeployment.options(name=f"shard-{s}", num_replicas=replicas).bind(str(p), d)
        for s, (p, d) in enumerate(zip(shard_paths(config.snapshot), shard_digests(config.snapshot)))
    ]
    return Ingress.options(name="ingress").bind(config, shards, replicas)


def run(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    num_cpus: int | None = None,
    blocking: bool = True,
) -> None:
    """Start Ray (a local cluster unless one is running) and Serve on ``host:port``, and serve."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, replicas), name="sterling", route_prefix="/", blocking=blocking)
