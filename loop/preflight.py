"""Start-up checks of a run on several processes, and naming the ranks a failed run lost.

    from loop.preflight import check_cluster
    check_cluster(accelerator, config)   # in train(), right after the Accelerator exists

Before anything heavy loads, every rank writes a join record into the rendezvous store (the
key-value store torch.distributed already talks to, at MASTER_ADDR:MASTER_PORT) and waits at most
`launch.preflight_seconds` for the others. A rank that never arrives fails the job within that
time, named with its node, instead of leaving every other rank in its first collective until
`launch.timeout_minutes`. This needs a process group that does not connect every pair of ranks
while it is created: NCCL connects lazily anyway, and `prepare_environment` (called by
`launcher.run.run_job` before training) asks gloo to do the same when the run spans several nodes.

Then, with several nodes, every node's local main process checks that it sees a token file rank 0
wrote next to `output.output_dir` (one output folder on a shared filesystem is required: a job
with a folder per node is refused, exit 2), and an all-reduce of `PREFLIGHT_BYTES` plus one round
trip from rank 0 to each other node measure the links. Bandwidths are logged; a link far slower
than the others is named. Each rank of a multi-node run then keeps a heartbeat counter in the
store, so that after a failure `name_lost_ranks` can tell the ranks that are gone (killed, crashed,
their machine lost) from the ones that are only waiting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

from launcher.config import JobConfig
from loop.run_dir import OutputDirError

logger = logging.getLogger(__name__)

PREFLIGHT_BYTES = 8 * 2**20
"""Size of the timed all-reduce and of each node's round trip."""
SLOW_LINK_RATIO = 4
"""A node whose link to rank 0 is this many times slower than the fastest one is named."""
HEARTBEAT_SECONDS = 1.0
"""How often each rank of a multi-node run bumps its heartbeat counter."""
LOST_AFTER_SECONDS = 4.0
"""A rank whose heartbeat did not move for this long after a failure is reported lost."""


class PreflightError(RuntimeError):
    """A rank or node that did not join the run, or a fabric that gives wrong sums; the message names it."""


@dataclass(frozen=True)
class Member:
    """One rank, as it describes itself in its join record."""

    rank: int
    node: int
    local_rank: int
    host: str


def spans_several_nodes() -> bool:
    """True when this process belongs to a launch over more than one machine."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local_world_size.isdigit():
        return world_size > int(local_world_size)
    return int(os.environ.get("SLURM_NNODES", "1")) > 1 and world_size > 1


def prepare_environment() -> None:
    """Before the process group exists: let gloo connect pairs of ranks on first use, not all at
    creation, so that a missing node is named by the preflight instead of hanging the creation."""
    if spans_several_nodes():
        os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")


def check_cluster(accelerator, config: JobConfig) -> None:
    """Join, check the shared output folder, measure the links, start the heartbeat.

    Raises `PreflightError` naming the ranks and nodes that did not join within
    `launch.preflight_seconds`, and `OutputDirError` (exit 2) when the nodes do not share the
    output folder. Does nothing on one process or with `launch.preflight_seconds = 0`.
    """
    import torch.distributed as dist

    seconds = config.launch.preflight_seconds
    if accelerator.num_processes == 1 or seconds == 0 or not dist.is_initialized():
        return
    store = _open_store(seconds)
    if store is None:
        logger.warning("preflight skipped: MASTER_ADDR and MASTER_PORT are not set, so there is no rendezvous "
                       "store to meet in")
        return
    me = _this_member()
    started = time.monotonic()
    members = _join(store, me, dist.get_world_size(), seconds)
    nodes = _ranks_by_node(members)
    if len(nodes) > 1:
        _check_shared_output_dir(store, me, nodes, members, config.output_path, seconds)
    message = _measure_links(accelerator, me, members, nodes)
    if me.rank == 0:
        logger.info("preflight: %d ranks on %d node(s) joined in %.1f s; %s", len(members), len(nodes),
                    time.monotonic() - started, message)
    if len(nodes) > 1:
        _Heartbeat.start(me.rank, len(members), seconds)


def stop_heartbeat() -> None:
    """Stop this rank's heartbeat once the run is over (after `name_lost_ranks`, if it failed)."""
    _Heartbeat.stop()


def name_lost_ranks() -> str | None:
    """After a failed multi-node run: which ranks are gone, with their nodes; None when none is.

    A rank whose heartbeat counter does not move for `LOST_AFTER_SECONDS` has stopped (killed,
    crashed, or its machine is lost); ranks still blocked in a collective keep beating. When the
    store itself is unreachable, node 0 (which holds it) is the one that was lost.
    """
    heartbeat = _Heartbeat.current
    if heartbeat is None:
        return None
    # torchrun stops a node's other ranks with SIGTERM as soon as one of them exits; finish the
    # roll call first (it takes seconds, well inside torchrun's grace period).
    with _ignoring(signal.SIGTERM):
        try:
            before = heartbeat.counts()
            time.sleep(LOST_AFTER_SECONDS)
            after = heartbeat.counts()
            members = heartbeat.members()
            # A rank that held its own roll call and exited is not lost, though its heartbeat stopped.
            left = [heartbeat.reader.check([f"left/{rank}"]) for rank in range(heartbeat.world_size)]
            heartbeat.reader.set(f"left/{heartbeat.rank}", "1")
        except (torch.distributed.DistError, OSError) as error:
            return (f"the rendezvous store at MASTER_ADDR:MASTER_PORT cannot be reached ({_first_line(error)}): "
                    "node 0, which holds it, was lost")
    lost = [rank for rank in range(heartbeat.world_size)
            if after[rank] == before[rank] and not left[rank] and rank != heartbeat.rank]
    if not lost:
        return None
    described = _describe(lost, members)
    return (f"lost {described}: no heartbeat for {LOST_AFTER_SECONDS:.0f} s after the failure (the process was "
            "killed or crashed, or its machine went down)")


# --- the rendezvous store ---------------------------------------------------------------------------

def _prefix() -> str:
    # One namespace per launch attempt: torchrun reuses its store across restarts.
    return f"trainer-engine/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _open_store(seconds: float):
    """A client of the store at MASTER_ADDR:MASTER_PORT (torchrun's agent store, or rank 0's under
    Ray and srun), in our own key namespace; None when the process group was not set up from them."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not host or not port.isdigit():
        return None
    client = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=max(seconds, 1)))
    return dist.PrefixStore(_prefix(), client)


def _this_member() -> Member:
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun says GROUP_RANK, Ray NODE_RANK, srun SLURM_NODEID; otherwise ranks fill nodes in order.
    for name in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        if os.environ.get(name, "").isdigit():
            node = int(os.environ[name])
            break
    else:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        node = rank // local_world_size if local_world_size else 0
    return Member(rank=rank, node=node, local_rank=local_rank, host=socket.gethostname())


def _join(store, me: Member, world_size: int, seconds: float) -> list[Member]:
    import torch.distributed as dist

    keys = [f"joined/{rank}" for rank in range(world_size)]
    store.set(keys[me.rank], json.dumps(asdict(me)))
    try:
        store.wait(keys, timedelta(seconds=seconds))
    except dist.DistStoreError:
        missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
        if missing:
            present = [Member(**json.loads(store.get(key))) for key in keys if store.check([key])]
            raise PreflightError(_missing_message(missing, present, world_size, seconds)) from None
    return [Member(**json.loads(value)) for value in store.multi_get(keys)]


def _missing_message(missing: list[int], present: list[Member], world_size: int, seconds: float) -> str:
    # A missing rank wrote nothing; torchrun and accelerate launch number ranks node by node with the
    # same count on every node, so its node follows from LOCAL_WORLD_SIZE.
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or None
    guessed = [Member(rank=r, node=r // per_node if per_node else -1, local_rank=-1, host="") for r in missing]
    return (f"preflight: {len(missing)} of {world_size} ranks did not join within {seconds} s: "
            f"{_describe(missing, guessed)}. Joined: {_describe([m.rank for m in present], present)}. "
            "A rank that never joins is on a node that did not start, or that is stuck before training "
            "(read that node's log). If the nodes only start far apart, raise launch.preflight_seconds.")


def _ranks_by_node(members: list[Member]) -> dict[int, list[Member]]:
    nodes: dict[int, list[Member]] = {}
    for member in sorted(members, key=lambda m: m.rank):
        nodes.setdefault(member.node, []).append(member)
    return nodes


def _describe(ranks: list[int], members: list[Member]) -> str:
    """'rank 3 (node 1, host b)' or 'ranks 2-3 (node 1, host b), rank 5 (node 2)'."""
    by_rank = {m.rank: m for m in members}
    groups: dict[tuple[int, str], list[int]] = {}
    for rank in sorted(ranks):
        member = by_rank.get(rank)
        groups.setdefault((member.node, member.host) if member else (-1, ""), []).append(rank)
    parts = []
    for (node, host), group in groups.items():
        where = ", ".join(p for p in (f"node {node}" if node >= 0 else "", f"host {host}" if host else "") if p)
        parts.append(f"{_rank_list(group)}" + (f" ({where})" if where else ""))
    return ", ".join(parts)


def _rank_list(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    runs, start = [], ranks[0]
    for previous, rank in zip(ranks, ranks[1:] + [None]):
        if rank != previous + 1:
            runs.append(f"{start}-{previous}" if previous != start else f"{start}")
            start = rank
    return "ranks " + ", ".join(runs)


# --- one output folder for every node --------------------------------------------------------------

def _check_shared_output_dir(store, me: Member, nodes: dict[int, list[Member]], members: list[Member],
                             output_path: Path, seconds: float) -> None:
    """Refuse the job when a node's local main process cannot see a file rank 0 wrote beside the folder.

    The token goes into the folder's parent (its nearest existing ancestor), never into the folder
    itself, and is removed before anyone leaves: a refused job leaves the output folder untouched.
    """
    token = None
    if me.rank == 0:
        token, record = _write_token(output_path)
        store.set("shared/token", json.dumps(record))
    try:
        if me.local_rank == 0:
            store.wait(["shared/token"], timedelta(seconds=seconds))
            record = json.loads(store.get("shared/token"))
            store.set(f"shared/node/{me.node}", "1" if _sees_token(output_path, record) else "0")
        node_keys = [f"shared/node/{node}" for node in nodes]
        store.wait(node_keys, timedelta(seconds=seconds))
        verdicts = dict(zip(nodes, (value.decode() for value in store.multi_get(node_keys))))
        record = json.loads(store.get("shared/token"))
    finally:
        if token is not None:
            token.unlink(missing_ok=True)
    blind = [node for node, verdict in verdicts.items() if verdict != "1"]
    if not record.get("relative"):
        if me.rank == 0:
            logger.warning("preflight: could not write a token beside %s, so whether every node sees that folder "
                           "was not checked", output_path)
        return
    if blind:
        hosts = ", ".join(f"node {node} (host {nodes[node][0].host})" for node in blind)
        raise OutputDirError(
            f"output.output_dir: {output_path} is not one folder shared by every node: {hosts} cannot see the file "
            "rank 0 wrote beside it. Rank 0 alone writes each checkpoint's progress and the result while every "
            "rank saves and loads its own state there, so a folder per node can neither save nor resume. Put "
            "output.output_dir on a filesystem every node mounts at the same path (NFS, Lustre, a cloud file "
            "share).")


def _write_token(output_path: Path) -> tuple[Path | None, dict]:
    content = uuid.uuid4().hex
    folder = Path(output_path).parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    token = folder / f".trainer-engine-shared-{content[:12]}"
    try:
        token.write_text(content, encoding="utf-8")
    except OSError:
        return None, {"relative": None, "content": content}
    return token, {"relative": os.path.relpath(token, output_path), "content": content}


def _sees_token(output_path: Path, record: dict) -> bool:
    if not record.get("relative"):
        return True
    path = Path(os.path.normpath(os.path.join(output_path, record["relative"])))
    try:
        return path.read_text(encoding="utf-8") == record["content"]
    except OSError:
        return False


# --- links -----------------------------------------------------------------------------------------

def _measure_links(accelerator, me: Member, members: list[Member], nodes: dict[int, list[Member]]) -> str:
    """Time an all-reduce of PREFLIGHT_BYTES over every rank, then a round trip from rank 0 to each
    other node's first rank; check the sum; return the line rank 0 logs (and warn about slow links)."""
    import torch.distributed as dist

    device = accelerator.device
    world_size = len(members)
    buffer = torch.ones(PREFLIGHT_BYTES // 4, dtype=torch.float32, device=device)
    dist.all_reduce(buffer)  # the first collective connects the ranks; time the second
    buffer.fill_(1.0)
    _synchronize(device)
    started = time.perf_counter()
    dist.all_reduce(buffer)
    _synchronize(device)
    seconds = time.perf_counter() - started
    if float(buffer[0]) != world_size or float(buffer[-1]) != world_size:
        raise PreflightError(f"preflight: an all-reduce of ones over {world_size} ranks gave {float(buffer[0])} "
                             "instead of the rank count; the interconnect or its driver is broken")
    bus = 2 * (world_size - 1) / world_size * PREFLIGHT_BYTES / seconds
    lines = [f"all-reduce of {PREFLIGHT_BYTES >> 20} MiB: {seconds * 1e3:.1f} ms (bus {_rate(bus)})"]

    links: dict[int, float] = {}
    home = next(m.node for m in members if m.rank == 0)
    for node, ranks in nodes.items():
        if node == home:
            continue
        peer = ranks[0].rank
        if me.rank == 0:
            dist.send(buffer[:1], peer)  # connect first, then time
            dist.recv(buffer[:1], peer)
            started = time.perf_counter()
            dist.send(buffer, peer)
            dist.recv(buffer, peer)
            _synchronize(device)
            links[node] = 2 * PREFLIGHT_BYTES / (time.perf_counter() - started)
        elif me.rank == peer:
            for part in (buffer[:1], buffer):
                dist.recv(part, 0)
                dist.send(part, 0)
    for node, rate in links.items():
        lines.append(f"link node {home} <-> node {node} (host {nodes[node][0].host}): {_rate(rate)}")
    if me.rank == 0 and len(links) > 1:
        fastest = max(links.values())
        for node, rate in links.items():
            if rate * SLOW_LINK_RATIO < fastest:
                logger.warning("preflight: node %d (host %s) is slow: %s to rank 0 against %s for the fastest "
                               "node; every step waits for it", node, nodes[node][0].host, _rate(rate), _rate(fastest))
    return "; ".join(lines)


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e9:.2f} GB/s" if bytes_per_second >= 1e8 else f"{bytes_per_second / 1e6:.1f} MB/s"


# --- heartbeats ------------------------------------------------------------------------------------

class _Heartbeat:
    """Each rank bumps `heartbeat/<rank>` every HEARTBEAT_SECONDS from a daemon thread with its own
    store connection; the main thread keeps another connection to read everyone's counters."""

    current: "_Heartbeat | None" = None

    def __init__(self, rank: int, world_size: int, seconds: float):
        self.rank, self.world_size = rank, world_size
        self.reader = _open_store(seconds)
        self._writer = _open_store(seconds)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="trainer-engine-heartbeat", daemon=True)

    @classmethod
    def start(cls, rank: int, world_size: int, seconds: float) -> None:
        cls.current = cls(rank, world_size, seconds)
        cls.current._thread.start()

    @classmethod
    def stop(cls) -> None:
        """End the beat and wait for the thread: a daemon thread still inside a store call when the
        interpreter exits can abort the process (SIGABRT) after it has written its result."""
        heartbeat, cls.current = cls.current, None
        if heartbeat is not None:
            heartbeat._stopped.set()
            heartbeat._thread.join(timeout=HEARTBEAT_SECONDS + 5)

    def _beat(self) -> None:
        key = f"heartbeat/{self.rank}"
        while True:
            try:
                self._writer.add(key, 1)
            except (torch.distributed.DistError, OSError):
                return  # the store went away with node 0; name_lost_ranks says so
            if self._stopped.wait(HEARTBEAT_SECONDS):
                return

    def counts(self) -> list[int]:
        return [self.reader.add(f"heartbeat/{rank}", 0) for rank in range(self.world_size)]

    def members(self) -> list[Member]:
        return [Member(**json.loads(v)) for v in self.reader.multi_get([f"joined/{r}" for r in range(self.world_size)])]


@contextlib.contextmanager
def _ignoring(signum: int):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
