"""KV transfer backends between real processes: exact round trips, failures that raise instead of
hanging, nothing left behind. Every multi-process test is guarded by a hard deadline: a hang fails.

`pytest -s tests/test_kv_transfer.py -k bandwidth` prints the 64 MiB bandwidth of shm and gloo.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import time
import traceback

import msgspec
import pytest
import torch

from kv_utils import ODD, bitwise_equal, check_kv, make_kv, shm_segments
from tetriinfer.cluster.kv import TRANSPORTS, KVTransferError, ShmTransport, make_transport
from tetriinfer.cluster.kv.cuda_ipc import IPC_FIELDS, decode_ipc, encode_ipc
from tetriinfer.net import free_port
from tetriinfer.config import KV_TRANSPORTS



# ---------------------------------------------------------------------------------------------
# Data and checks


# ---------------------------------------------------------------------------------------------
# A cluster of spawned processes: control messages over pipes (msgpack, as over ZeroMQ), the
# bytes through the transport under test.


class Peer:
    """One process's control channel to the other ranks (stands in for the ZeroMQ messages)."""

    def __init__(self, conns):
        self.conns = conns

    def send(self, peer: int, msg) -> None:
        self.conns[peer].send_bytes(msgspec.msgpack.encode(msg))

    def get(self, peer: int, timeout: float = 30.0):
        if not self.conns[peer].poll(timeout):
            raise TimeoutError(f"no control message from rank {peer} in {timeout} s")
        return msgspec.msgpack.decode(self.conns[peer].recv_bytes())


CLUSTER_ID = secrets.token_hex(4)  # a spawned worker gets its run's, as instances get their cluster's


def _worker(rank, world_size, port, kind, scenario_name, timeout_s, device, conns, results, cluster_id):
    global CLUSTER_ID
    CLUSTER_ID = cluster_id
    torch.set_num_threads(1)
    try:
        transport = make_transport(kind, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                                   device=device, timeout_s=timeout_s, cluster_id=cluster_id)
        payload = globals()[scenario_name](rank, transport, Peer(conns))
        transport.close()
        results.put((rank, "ok", payload))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_cluster(kind, scenario, world_size=2, timeout_s=30.0, deadline_s=60.0, dying=(), devices=None):
    """Run `scenario(rank, transport, peer)` in `world_size` spawned processes; returns each
    surviving rank's payload. Ranks in `dying` exit on their own without reporting."""
    ctx = mp.get_context("spawn")
    conns = [dict() for _ in range(world_size)]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            conns[a][b], conns[b][a] = ctx.Pipe()
    results = ctx.Queue()
    port = free_port()
    cluster_id = secrets.token_hex(4)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, kind, scenario.__name__, timeout_s,
                               devices[r] if devices else "cpu", conns[r], results, cluster_id))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + deadline_s
    expected = world_size - len(dying)
    got = {}
    try:
        while len(got) < expected:
            try:
                rank, status, payload = results.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(got) - set(dying))
                pytest.fail(f"{kind} {scenario.__name__}: ranks {missing} hung past {deadline_s} s")
            assert status == "ok", f"rank {rank} failed:\n{payload}"
            got[rank] = payload
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 5.0))
            assert not p.is_alive(), f"{kind} {scenario.__name__}: a process did not exit"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return got


# ---------------------------------------------------------------------------------------------
# Scenarios (run inside the spawned processes)

CASES = [(torch.float32, ODD), (torch.bfloat16, ODD), (torch.float16, (1, 1, 1, 3)), (torch.bfloat16, (4, 129, 8, 16))]


def send_one(t, peer: Peer, dst, tid, seed, dtype, shape, noncontiguous=False):
    k, v = make_kv(seed, shape, dtype, device=getattr(t, "device", "cpu"))
    if noncontiguous:  # a strided view, as a slice of a larger cache would be
        k2, v2 = make_kv(seed, shape, dtype, device=getattr(t, "device", "cpu"))
        k = torch.stack([k, k2], dim=-1)[..., 0]
        assert not k.is_contiguous()
    desc = t.start_send(dst, tid, k, v)
    assert desc["nbytes"] == 2 * k.numel() * k.element_size()
    peer.send(dst, {"tid": tid, "seed": seed, "dtype": str(dtype)[6:], "shape": list(shape), "desc": desc})
    assert peer.get(dst) == {"ack": tid}  # as the instances do: release on the receiver's KVDone
    t.release(tid)


def recv_one(t, peer: Peer, src, timeout=10.0):
    msg = peer.get(src)
    got = t.recv(src, msg["tid"], msg["desc"], timeout)
    peer.send(src, {"ack": msg["tid"]})
    check_kv(got, msg["seed"], tuple(msg["shape"]), getattr(torch, msg["dtype"]), f"transfer {msg['tid']}")
    return got


def failed_send_s(t, peer: Peer, dst, tid, *, post: bool, wait_s: float = 20.0) -> float:
    """Start gloo transfer `tid` to `dst` (posting its descriptor to `dst` if `post`): seconds from
    start_send (where the transport's deadline starts) until its sender thread raises. The instances
    never wait for that thread (the receiver's KVDone or their own deadline ends a transfer); this
    test does, to time the transport's deadline. The failed send is then cancelled, as they do."""
    start = time.monotonic()
    desc = t.start_send(dst, tid, *make_kv(tid))
    if post:
        peer.send(dst, {"desc": desc})
    with pytest.raises(KVTransferError):
        t._sends[tid].future.result(timeout=wait_s)
    elapsed = time.monotonic() - start
    t.cancel_send(tid)
    assert tid not in t._sends  # nothing kept for it
    return elapsed


def failed_recv_s(t, peer: Peer, src, tid, timeout: float) -> float:
    """Take the next descriptor `src` posts: seconds until recv(src, tid, ..., timeout) raises."""
    desc = peer.get(src)["desc"]
    start = time.monotonic()
    with pytest.raises(KVTransferError):
        t.recv(src, tid, desc, timeout)
    return time.monotonic() - start


def scenario_round_trips(rank, t, peer: Peer):
    """Several transfers each way between one pair, odd shapes, 3 dtypes, strided input, and two
    transfers in flight at once received in reverse order (not for nccl: it matches by order)."""
    other = 1 - rank
    for direction in (0, 1):
        for i, (dtype, shape) in enumerate(CASES):
            tid = 100 * direction + i
            if rank == direction:
                send_one(t, peer, other, tid, seed=tid, dtype=dtype, shape=shape, noncontiguous=(i == 0))
            else:
                recv_one(t, peer, other)
    # ping-pong: rank 1 sends back what it received
    for i in range(3):
        if rank == 0:
            send_one(t, peer, 1, 200 + i, seed=200 + i, dtype=torch.bfloat16, shape=ODD)
            msg = peer.get(1)
            got = t.recv(1, msg["tid"], msg["desc"], 10.0)
            peer.send(1, {"ack": msg["tid"]})
            check_kv(got, 200 + i, ODD, torch.bfloat16, "echo")
        else:
            k, v = recv_one(t, peer, 0)
            desc = t.start_send(0, 300 + i, k, v)
            peer.send(0, {"tid": 300 + i, "desc": desc})
            assert peer.get(0) == {"ack": 300 + i}
            t.release(300 + i)
    if t.name != "nccl":
        if rank == 0:
            tids = (400, 401)
            for tid in tids:
                desc = t.start_send(1, tid, *make_kv(tid, ODD, torch.float32, device=getattr(t, "device", "cpu")))
                assert desc["nbytes"] > 0
                peer.send(1, {"tid": tid, "seed": tid, "dtype": "float32", "shape": list(ODD), "desc": desc})
            assert sorted(peer.get(1)["acks"]) == list(tids)
            for tid in tids:
                t.release(tid)
        else:
            msgs = [peer.get(0), peer.get(0)]
            for msg in reversed(msgs):
                check_kv(t.recv(0, msg["tid"], msg["desc"], 10.0), msg["seed"], ODD, torch.float32, "reversed")
            peer.send(0, {"acks": [m["tid"] for m in msgs]})
    # Suffixes (prefix caching across the hand-off): the KV from a block boundary on, a strided
    # view of a longer context's token dimension, down to its last token.
    device = getattr(t, "device", "cpu")
    full_k, full_v = make_kv(500, (3, 40, 2, 5), torch.bfloat16, device=device)
    for i, start in enumerate((8, 32, 39)):
        tid = 500 + i
        if rank == 0:
            k, v = full_k[:, start:], full_v[:, start:]
            assert not k.is_contiguous()
            desc = t.start_send(1, tid, k, v)
            peer.send(1, {"tid": tid, "desc": desc})
            assert desc["nbytes"] == 2 * k.numel() * k.element_size()
            assert peer.get(1) == {"ack": tid}
            t.release(tid)
        else:
            msg = peer.get(0)
            got = t.recv(0, msg["tid"], msg["desc"], 10.0)
            peer.send(0, {"ack": msg["tid"]})
            assert bitwise_equal(got[0], full_k[:, start:]) and bitwise_equal(got[1], full_v[:, start:]), start
    if t.name == "shm":
        return shm_segments(t.name_prefix)
    return None


def scenario_gloo_timeouts(rank, t, peer: Peer):
    """Timeouts on either side raise within about the timeout (1 s: the transport's for sends, the
    call's for receives), and the pair recovers: later transfers arrive intact. Phases are
    synchronised over the control pipe."""
    timeout = 1.0
    out = {}
    if rank == 0:
        desc = t.start_send(1, 1, *make_kv(1))  # builds the connection
        peer.send(1, {"tid": 1, "seed": 1, "dtype": "float32", "shape": list(ODD), "desc": desc})
        assert peer.get(1) == {"ack": 1}
        t.release(1)
        # 1. a sender that never sends: a descriptor of the live connection, for a transfer never started
        peer.send(1, {"desc": desc})
        assert peer.get(1) == "recv timed out"
        # 2. the next transfer, on the connection rank 1 dropped, fails fast on both sides
        out["stale_send_s"] = failed_send_s(t, peer, 1, 3, post=True, wait_s=10.0)
        assert peer.get(1) == "stale rejected"
        # 3. a receiver that never receives: the send times out building the new connection
        out["send_timeout_s"] = failed_send_s(t, peer, 1, 4, post=False, wait_s=10.0)
        # 4. then a connected receiver that does not receive: the send times out on a live connection
        send_one(t, peer, 1, 5, seed=5, dtype=torch.bfloat16, shape=ODD)
        out["live_send_timeout_s"] = failed_send_s(t, peer, 1, 6, post=False, wait_s=10.0)
        t.cancel_send(6)  # idempotent after the end
        peer.send(1, "send timed out")
        # 5. recovered: both directions carry exact data again
        assert peer.get(1) == "go"
        for i in range(2):
            send_one(t, peer, 1, 10 + i, seed=10 + i, dtype=torch.bfloat16, shape=ODD)
        recv_one(t, peer, 1)
    else:
        recv_one(t, peer, 0)
        out["recv_timeout_s"] = failed_recv_s(t, peer, 0, 2, timeout)
        peer.send(0, "recv timed out")
        out["stale_recv_s"] = failed_recv_s(t, peer, 0, 3, timeout)
        peer.send(0, "stale rejected")
        recv_one(t, peer, 0)  # transfer 5, on a fresh connection
        assert peer.get(0) == "send timed out"
        peer.send(0, "go")
        for _ in range(2):
            recv_one(t, peer, 0)
        send_one(t, peer, 0, 20, seed=20, dtype=torch.float16, shape=ODD)
    return out


def scenario_gloo_dead_peers(rank, t, peer: Peer):
    """Rank 1 dies after posting a descriptor but before sending (rank 0 is receiving); rank 2 dies
    instead of receiving (rank 0 is sending). Rank 0 must get errors, not hang; a later send to a
    dead rank fails by its deadline (the transport's timeout, 2 s)."""
    out = {}
    if rank == 0:
        recv_one(t, peer, 1)
        out["sender_died_s"] = failed_recv_s(t, peer, 1, 2, 20.0)
        send_one(t, peer, 2, 1, seed=1, dtype=torch.float32, shape=ODD)
        out["receiver_died_s"] = failed_send_s(t, peer, 2, 2, post=True)
        out["send_to_dead_s"] = failed_send_s(t, peer, 1, 3, post=False)
    elif rank == 1:
        desc = t.start_send(0, 1, *make_kv(1))
        peer.send(0, {"tid": 1, "seed": 1, "dtype": "float32", "shape": list(ODD), "desc": desc})
        assert peer.get(0) == {"ack": 1}
        t.release(1)
        peer.send(0, {"tid": 2, "desc": desc})  # transfer 2 will never be sent: this process dies
        time.sleep(0.5)
        os._exit(0)
    else:
        recv_one(t, peer, 0)
        peer.get(0)
        os._exit(0)
    return out


MIB64 = (16, 1024, 8, 64)  # float32: 32 MiB each for K and V, 64 MiB in all


def scenario_bandwidth(rank, t, peer: Peer):
    """64 MiB (K + V) rank 0 -> rank 1 through shm and gloo, 3 times each; times on both sides."""
    shm = ShmTransport(rank=rank, cluster_id=CLUSTER_ID)
    out = {}
    k, v = make_kv(7, MIB64)  # once: random numbers cost more than the transfer here
    for transport in (shm, t):
        rows = []
        for i in range(3):
            tid = 1000 + i
            if rank == 0:
                start = time.monotonic()
                desc = transport.start_send(1, tid, k, v)
                send_s = time.monotonic() - start  # shm: the copy into the segment; gloo: staging
                peer.send(1, {"desc": desc, "start": start})
                assert peer.get(1) == {"ack": tid}
                transport.release(tid)
                rows.append({"send_s": send_s, "nbytes": desc["nbytes"]})
            else:
                msg = peer.get(0)
                recv_start = time.monotonic()
                got = transport.recv(0, tid, msg["desc"], 30.0)
                end = time.monotonic()  # CLOCK_MONOTONIC: comparable between processes of one host
                assert bitwise_equal(got[0], k) and bitwise_equal(got[1], v), "64 MiB: K/V differ"
                del got
                peer.send(0, {"ack": tid})  # after the check: the next transfer finds this process idle
                rows.append({"recv_s": end - recv_start, "end_to_end_s": end - msg["start"]})
        out[transport.name] = rows
    shm.close()
    return out


# ---------------------------------------------------------------------------------------------
# Tests: shm


def test_shm_round_trips_between_processes():
    got = run_cluster("shm", scenario_round_trips)
    assert got[0] == [] and got[1] == [], "shm segments left behind"


def test_gloo_round_trips_between_processes():
    run_cluster("gloo", scenario_round_trips)


def test_gloo_timeouts_raise_in_time_and_the_pair_recovers():
    got = run_cluster("gloo", scenario_gloo_timeouts, timeout_s=1.0, deadline_s=90.0)
    sender, receiver = got[0], got[1]
    print(f"\ngloo, timeout 1 s: sender {sender}, receiver {receiver}")
    assert 0.8 <= receiver["recv_timeout_s"] < 3.0, receiver
    assert receiver["stale_recv_s"] < 0.5, receiver  # rejected without waiting
    assert sender["stale_send_s"] < 3.0, sender
    assert 0.8 <= sender["send_timeout_s"] < 3.0, sender
    assert 0.8 <= sender["live_send_timeout_s"] < 3.0, sender


def test_gloo_dead_peer_raises_instead_of_hanging():
    got = run_cluster("gloo", scenario_gloo_dead_peers, world_size=3, dying=(1, 2), timeout_s=2.0, deadline_s=90.0)
    out = got[0]
    print(f"\ngloo dead peers: {out}")
    assert out["sender_died_s"] < 10.0, out  # the closed connection is noticed, not waited out (20 s)
    assert out["receiver_died_s"] < 10.0, out
    assert 1.5 <= out["send_to_dead_s"] < 5.0, out


# ---------------------------------------------------------------------------------------------
# Bandwidth (printed, not asserted)


def test_bandwidth_64mib_shm_and_gloo():
    got = run_cluster("gloo", scenario_bandwidth, deadline_s=120.0)
    for name in ("shm", "gloo"):
        rows = zip(got[0][name], got[1][name])
        lines = []
        for send, recv in rows:
            gb = send["nbytes"] / 1e9
            lines.append(f"end-to-end {recv['end_to_end_s'] * 1e3:7.1f} ms = {gb / recv['end_to_end_s']:5.2f} GB/s "
                         f"(start_send {send['send_s'] * 1e3:6.1f} ms, receiver {recv['recv_s'] * 1e3:6.1f} ms)")
        print(f"\n{name} 64 MiB (K+V float32 {MIB64} x 2), 2-core CPU:\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------
# Plumbing that needs no peer


def test_auto_transport_and_names():
    from tetriinfer.cluster.plan import resolve_transport
    from tetriinfer.config import ServeConfig

    auto = ServeConfig()
    assert resolve_transport(auto, ["cpu"]) == "shm"
    assert resolve_transport(auto, ["cuda:0", "cuda:1"]) == "cuda_ipc"
    assert resolve_transport(auto, ["cuda:0"], multi_node=True) == "nccl"
    assert resolve_transport(auto, ["cpu"], multi_node=True) == "gloo"
    assert set(TRANSPORTS) == set(KV_TRANSPORTS) - {"auto"}  # what --kv-transport offers


def test_cuda_ipc_descriptor_fields_are_plain_data_and_round_trip():
    import inspect

    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    # the descriptor's fields are this torch's rebuild_cuda_tensor arguments, in order
    assert tuple(inspect.signature(rebuild_cuda_tensor).parameters) == IPC_FIELDS
    args = (torch.Tensor, torch.Size([10]), (1,), 0, torch.storage.TypedStorage, torch.uint8, 0, b"\x01" * 64,
            512, 128, False, b"/torch_123_ref", 3, b"\x02" * 64, True)
    fields = encode_ipc((rebuild_cuda_tensor, args))
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(fields))  # plain msgpack, no pickle
    assert decode_ipc(wire) == args
    with pytest.raises(ValueError, match="unknown classes"):
        decode_ipc({**wire, "storage_cls": "os.system"})
    with pytest.raises(ValueError, match="dtype"):
        decode_ipc({**wire, "dtype": "load"})


# ---------------------------------------------------------------------------------------------
# GPU backends (skipped without CUDA)


@pytest.mark.gpu
def test_cuda_ipc_round_trips_between_processes():
    n = torch.cuda.device_count()
    run_cluster("cuda_ipc", scenario_round_trips, devices=["cuda:0", f"cuda:{min(1, n - 1)}"])


@pytest.mark.gpu
def test_nccl_round_trips_between_processes():
    if torch.cuda.device_count() < 2:
        pytest.skip("nccl needs two GPUs")
    run_cluster("nccl", scenario_round_trips, devices=["cuda:0", "cuda:1"], deadline_s=120.0)
