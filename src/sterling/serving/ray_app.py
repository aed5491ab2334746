"""Item-sharded serving on Ray Serve (``sterling serve --engine ray --shards N --replicas R``;
``[ray]`` extra).

Deployments::

    shard-{s}-replica-{r}   ShardDeployment, one Serve replica each (s < N, r < R): a ShardSearcher
                            over shard snapshot s (its Bloom + int8 IVF index part and embedding cache)
    ingress                 the same FastAPI app as ``sterling serve`` (:func:`create_app`), whose
                            model is a ShardedModel: user tower once, fan-out to the shards,
                            merge_topk, OverArch + Value Model

A deployment per replica lets the ingress address every replica: it calls them from its model
thread through deployment handles (all those a step asks first, then the results), so a request's
shard searches run in parallel. A read goes to one replica of each shard, the next one each time;
an update (``POST /v1/items``) goes to every replica of its shards, and its 200 comes after all have
applied it. Each shard's updates carry sequence numbers and each read the number the ingress has
acknowledged, so a request sent after a write's 200 sees the write, whichever replica answers it;
a replica that Ray restarted (which reloads its snapshot) is sent the updates it lacks before it
answers (:mod:`sterling.serving.shards`: the protocol). Every deployment asks Ray for no CPU of its
own: the tensors' thread pools share the machine's cores.

Hot reload (``POST /v1/admin/reload`` with another sharded snapshot of as many shards): the
ingress loads the new shard-0 weights, and every shard call names the shard snapshot and the
ingress model it is for, so building the new model has every replica load its new part beside the
old one (a replica keeps two); the ingress then switches between two batches, as the single-process
server does, with the live updates acknowledged meanwhile replayed onto the new shards' replicas.

Example::

    ray.init(num_cpus=2)
    app = build_app(ServerConfig(Path("runs/snap-sharded"), token="t"), replicas=1)
    serve.run(app, name="sterling", route_prefix="/")
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from sterling.serving.server import ServerConfig, create_app
from sterling.serving.shards import ShardedModel, ShardSearcher, shard_digests, shard_paths

__all__ = ["build_app", "run"]


def _deployments():
    """The deployment classes (Ray is imported only when the Ray engine is used)."""
    from ray import serve

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    class ShardDeployment:
        """One replica of one shard. A call names the shard snapshot and the ingress model it is
        for (``model``: each model numbers its updates from 1, so each has a searcher of its own),
        loaded on its first call; the current one and the one a reload brings in are kept, so a swap
        never waits on a load twice. A replica that lost its searcher (Ray restarted it, or a third
        model's pushed it out) loads it again, with no update applied: the ingress catches it up."""

        def __init__(self) -> None:
            self.searchers: OrderedDict[tuple[str, str, str], ShardSearcher] = OrderedDict()
            self.lock = threading.Lock()  # Serve runs sync methods on a thread pool

        def _searcher(self, path: str, digest: str, model: str) -> ShardSearcher:
            key = (path, digest, model)
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

        def call(self, path: str, digest: str, model: str, method: str, *args):
            return getattr(self._searcher(path, digest, model), method)(*args)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class Ingress:
        async def __init__(self, config: ServerConfig, shards: list[list]) -> None:
            self.config, self.shards = config, shards  # per shard, a handle per replica
            # off the event loop: loading waits on the shards, which Serve forbids on the loop
            self._app = await asyncio.to_thread(create_app, replace(config, loader=self._load))

        def _load(self, path: Path) -> ShardedModel:
            """The model of the sharded snapshot ``path``: its shard-0 weights here, and every
            shard replica asked for ``path``'s shard under a name of this model's own (each loads
            it on its first call)."""
            paths, digests = shard_paths(path), shard_digests(path)
            if len(paths) != len(self.shards):
                raise ValueError(f"{path} has {len(paths)} shards, the app runs {len(self.shards)}")
            model = uuid.uuid4().hex
            return ShardedModel(
                ShardSearcher.load(paths[0], digests[0]).model,
                [[_caller(h, p, d, model) for h in replicas] for replicas, p, d in zip(self.shards, paths, digests)],
            )

        def __serve_build_asgi_app__(self):
            return self._app

    return ShardDeployment, Ingress


def _caller(handle, path: Path, digest: str, model: str):
    def call(method: str, *args):
        return handle.call.remote(str(path), digest, model, method, *args)

    return call


def build_app(config: ServerConfig, replicas: int = 1):
    """The Ray Serve application of the sharded snapshot ``config.snapshot`` (``shards.json`` +
    ``shard-*``), ``replicas`` replicas per shard."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    ShardDeployment, Ingress = _deployments()
    shards = [
        [ShardDeployment.options(name=f"shard-{s}-replica-{r}").bind() for r in range(replicas)]
        for s in range(len(shard_paths(config.snapshot)))
    ]
    return Ingress.options(name="ingress").bind(config, shards)


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
