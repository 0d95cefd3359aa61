"""The shared-memory KV transport in one process and against subprocesses: cancels and gone
segments raise, bad input is named, the receiver takes only its own transfer's segment, a
restarted rank cleans up after its predecessor, and a segment outlives its sender cleanly."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import msgspec
import pytest

from kv_utils import REPO, bitwise_equal, make_kv, shm_segments
from tetriinfer.cluster.kv import KVTransferError, ShmTransport, make_transport


def test_shm_cancel_and_gone_segments_raise_and_leave_nothing():
    k, v = make_kv(0)
    with ShmTransport() as t:
        desc = t.start_send(1, 7, k, v)
        assert len(shm_segments(t.name_prefix)) == 1
        t.cancel_send(7)  # the receiver never came
        assert shm_segments(t.name_prefix) == []
        t.cancel_send(7)  # idempotent
        start = time.monotonic()
        with pytest.raises(KVTransferError, match="gone"):
            t.recv(0, 7, desc, 5.0)
        assert time.monotonic() - start < 1.0
        assert 7 not in t._sends  # nothing kept for it
        # received once: the segment is gone, a second recv raises
        desc = t.start_send(1, 8, k, v)
        got = t.recv(0, 8, desc, 5.0)
        assert bitwise_equal(got[0], k) and bitwise_equal(got[1], v)
        assert shm_segments(t.name_prefix) == []
        with pytest.raises(KVTransferError):
            t.recv(0, 8, desc, 5.0)
        # close() unlinks what was never received
        t.start_send(1, 9, k, v)
        t.start_send(1, 10, k, v)
        assert len(shm_segments(t.name_prefix)) == 2
    assert shm_segments(t.name_prefix) == []


def test_shm_bad_input_names_the_problem():
    k, v = make_kv(0)
    with ShmTransport() as t:
        with pytest.raises(ValueError, match="must match"):
            t.start_send(1, 1, k, v[:, :5])
        with pytest.raises(ValueError, match="empty"):
            t.start_send(1, 1, k[:, :0], v[:, :0])
        desc = t.start_send(1, 1, k, v)
        with pytest.raises(ValueError, match="already started"):
            t.start_send(1, 1, k, v)
        with pytest.raises(ValueError, match="gloo"):
            t.recv(0, 1, {**desc, "transport": "gloo"}, 1.0)
        with pytest.raises(ValueError, match="bytes"):
            t.recv(0, 1, {**desc, "nbytes": 12}, 1.0)
        with pytest.raises(ValueError, match="dtype"):
            t.recv(0, 1, {**desc, "dtype": "float99"}, 1.0)
    with pytest.raises(ValueError, match="unknown KV transport"):
        make_transport("rdma", rank=0, world_size=2, init_method=None, device="cpu")
    with pytest.raises(ValueError, match="init_method"):
        make_transport("gloo", rank=0, world_size=2, init_method=None, device="cpu")
    with pytest.raises(ValueError, match="cluster's id"):
        make_transport("shm", rank=0, world_size=2, init_method=None, device="cpu")
    with pytest.raises(ValueError, match="hex digits"):
        ShmTransport(cluster_id="../../etc")


def test_shm_receiver_refuses_any_segment_but_the_transfer_own_and_leaves_it_alone():
    """A KVPush naming another file (outside the cluster, another cluster's, another transfer's or
    another sender's) must not make the decode side open, let alone unlink, it."""
    cluster = secrets.token_hex(4)
    k, v = make_kv(0)
    sender, receiver = ShmTransport(rank=0, cluster_id=cluster), ShmTransport(rank=1, cluster_id=cluster)
    victims = [f"tetriinfer-victim-{cluster}", f"tikv{secrets.token_hex(4)}_0_7", f"tikv{cluster}_0_8",
               f"tikv{cluster}_2_7"]
    try:
        for name in victims:
            with open(f"/dev/shm/{name}", "wb") as f:
                f.write(b"\0" * 4096)
        desc = sender.start_send(1, 7, k, v)
        for name in victims:
            with pytest.raises(ValueError, match="refused"):
                receiver.recv(0, 7, {**desc, "name": name}, 1.0)
            assert os.path.exists(f"/dev/shm/{name}"), f"{name} was unlinked"
        with pytest.raises(ValueError, match="refused"):
            receiver.recv(2, 7, desc, 1.0)  # the right name, claimed by another sender
        got = receiver.recv(0, 7, desc, 1.0)  # the transfer's own segment still arrives
        assert bitwise_equal(got[0], k) and bitwise_equal(got[1], v)
    finally:
        for name in victims:
            if os.path.exists(f"/dev/shm/{name}"):
                os.unlink(f"/dev/shm/{name}")
        sender.close()


def test_shm_restarted_rank_removes_what_its_dead_predecessor_left_and_nothing_else():
    cluster = secrets.token_hex(4)
    k, v = make_kv(0)
    dead, other = ShmTransport(rank=0, cluster_id=cluster), ShmTransport(rank=1, cluster_id=cluster)
    dead.start_send(1, 7, k, v)  # never received: its process "died" (never closed)
    other.start_send(0, 7, k, v)
    assert len(shm_segments(f"tikv{cluster}_")) == 2
    with ShmTransport(rank=0, cluster_id=cluster, remove_stale=True) as successor:
        assert shm_segments(f"tikv{cluster}_") == [f"/dev/shm/{other.segment_name(7)}"]
        desc = successor.start_send(1, 7, k, v)  # the same transfer id is free again
        got = other.recv(0, 7, desc, 1.0)
        assert bitwise_equal(got[0], k)
    other.close()
    assert shm_segments(f"tikv{cluster}_") == []


_SEND_SCRIPT = """
import sys, msgspec, torch
sys.path.insert(0, {tests!r})
from kv_utils import make_kv
from tetriinfer.cluster.kv import ShmTransport
t = ShmTransport(rank=0, cluster_id={cluster!r})
desc = t.start_send(1, 5, *make_kv(5, dtype=torch.bfloat16))
print(msgspec.msgpack.encode(desc).hex())
"""  # exits without release/close: the receiver owns the segment now

_RECV_SCRIPT = """
import sys, msgspec, torch
sys.path.insert(0, {tests!r})
from kv_utils import check_kv, ODD
from tetriinfer.cluster.kv import ShmTransport
desc = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]))
check_kv(ShmTransport(rank=1, cluster_id={cluster!r}).recv(0, 5, desc, 1.0), 5, ODD, torch.bfloat16)
print("ok")
"""


def test_shm_segment_outlives_its_sender_and_no_tracker_complains():
    """Each side in its own interpreter (own resource_tracker): the sender's tracker must not unlink
    the segment when the sender exits, nor warn about it; the receiver's must not either."""
    tests = os.path.join(REPO, "tests")
    cluster = secrets.token_hex(4)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    sender = subprocess.run([sys.executable, "-c", _SEND_SCRIPT.format(tests=tests, cluster=cluster)], capture_output=True,
                            text=True, env=env, timeout=60)
    assert sender.returncode == 0, sender.stderr
    assert "resource_tracker" not in sender.stderr and "leaked" not in sender.stderr, sender.stderr
    desc = msgspec.msgpack.decode(bytes.fromhex(sender.stdout.strip()))
    assert os.path.exists(f"/dev/shm/{desc['name']}"), "the segment died with its sender"
    receiver = subprocess.run([sys.executable, "-c", _RECV_SCRIPT.format(tests=tests, cluster=cluster), sender.stdout.strip()],
                              capture_output=True, text=True, env=env, timeout=60)
    assert receiver.returncode == 0 and receiver.stdout.strip() == "ok", receiver.stderr
    assert "resource_tracker" not in receiver.stderr and "leaked" not in receiver.stderr, receiver.stderr
    assert not os.path.exists(f"/dev/shm/{desc['name']}")


# ---------------------------------------------------------------------------------------------
# Tests: gloo
