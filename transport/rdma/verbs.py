"""The small verbs interface the RDMA protocol needs, and its implementation on pyverbs.

The protocol (`transport.rdma.protocol`) talks only to `Device` and `QueuePair` below, so it imports
and is tested without pyverbs or an RDMA device. `PyverbsDevice` is the one real implementation: an
RC queue pair with its own completion queue and completion channel, memory registration (host
memory, or GPU memory through dma-buf when the driver exports it), RDMA WRITE with immediate and
zero-length SEND with immediate.
"""

from __future__ import annotations

import enum
import os
import select
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SYS_INFINIBAND = Path("/sys/class/infiniband")


class VerbsError(RuntimeError):
    """The verbs layer refused an operation (device missing, QP in error, registration failed)."""


@dataclass(frozen=True)
class QpInfo:
    """What the peer needs to connect an RC queue pair to ours (exchanged over the side channel)."""

    qp_num: int
    lid: int
    gid: str
    psn: int


@dataclass
class MemoryRegion:
    """A registered buffer: `addr`/`rkey` for the peer's WRITEs, `lkey` for our own work requests."""

    addr: int
    length: int
    lkey: int
    rkey: int
    buffer: memoryview  # host view of the memory (a pinned or ordinary host buffer)


class Opcode(enum.Enum):
    WRITE = "write"  # our RDMA WRITE with immediate finished
    SEND = "send"  # our SEND with immediate finished
    RECV = "recv"  # a peer's WRITE or SEND with immediate consumed one of our posted receives


@dataclass(frozen=True)
class Completion:
    wr_id: int
    opcode: Opcode
    ok: bool
    imm: int | None = None
    byte_len: int = 0
    status: str = "success"


class QueuePair(Protocol):
    """One reliable-connected queue pair with its completion queue; all calls are thread-safe enough
    for one poller thread plus one posting thread (the verbs' own guarantee)."""

    info: QpInfo

    def connect(self, remote: QpInfo) -> None: ...

    def register(self, buffer) -> MemoryRegion: ...

    def post_recv(self, wr_id: int) -> None: ...

    def post_write_imm(
        self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int, rkey: int, imm: int
    ) -> None: ...

    def post_send_imm(self, wr_id: int, imm: int) -> None: ...

    def wait_completions(self, timeout_s: float) -> list[Completion]: ...

    def to_error(self, status: str) -> None:
        """Move to the error state: the peer's writes and sends from now on fail at the peer."""

    def close(self) -> None: ...


class Device(Protocol):
    supports_dmabuf: bool

    def open_qp(self, depth: int) -> QueuePair: ...


def rdma_unavailable_reason() -> str | None:
    """Why this host cannot run the RDMA backend, or None when it can."""
    try:
        import pyverbs.device  # noqa: F401
    except ImportError as exc:
        return f"pyverbs is not importable ({exc}); install the `rdma` extra (see README)"
    if not SYS_INFINIBAND.is_dir() or not any(SYS_INFINIBAND.iterdir()):
        return f"no RDMA device under {SYS_INFINIBAND}"
    return None


class PyverbsDevice:
    """An RDMA device opened with pyverbs (`name`: e.g. "mlx5_0"; None: the first one)."""

    def __init__(self, name: str | None = None, *, port: int = 1, gid_index: int = 0):
        reason = rdma_unavailable_reason()
        if reason:
            raise VerbsError(reason)
        import pyverbs.device as d
        from pyverbs.pd import PD

        names = [dev.name.decode() for dev in d.get_device_list()]
        if not names or (name and name not in names):
            raise VerbsError(f"RDMA device {name!r} not found; present: {names}")
        self.name = name or names[0]
        self.context = d.Context(name=self.name)
        self.pd = PD(self.context)
        self.port = port
        self.gid_index = gid_index
        self.supports_dmabuf = _dmabuf_supported()

    def open_qp(self, depth: int) -> PyverbsQueuePair:
        return PyverbsQueuePair(self, depth)


def _dmabuf_supported() -> bool:
    """CUDA memory can be registered: cuda-python exports a dma-buf fd, mlx5's pyverbs class takes it."""
    try:
        from cuda.bindings import driver  # noqa: F401
        from pyverbs.providers.mlx5.mlx5dv_dmabuf import Mlx5DmaBufMR  # noqa: F401
    except ImportError:
        return False
    return True


class PyverbsQueuePair:
    """RC QP + CQ + completion channel on pyverbs. Written against pyverbs' documented API; see README
    for what has and has not run on hardware."""

    def __init__(self, device: PyverbsDevice, depth: int):
        import pyverbs.enums as e
        from pyverbs.cq import CQ, CompChannel
        from pyverbs.qp import QP, QPCap, QPInitAttr

        self._e = e
        self._device = device
        self._channel = CompChannel(device.context)
        self._cq = CQ(device.context, 2 * depth + 2, None, self._channel, 0)
        self._cq.req_notify()
        cap = QPCap(max_send_wr=depth + 1, max_recv_wr=depth + 1, max_send_sge=1, max_recv_sge=1)
        self._qp = QP(device.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap))
        port_attr = device.context.query_port(device.port)
        gid = device.context.query_gid(device.port, device.gid_index)
        self.info = QpInfo(qp_num=self._qp.qp_num, lid=port_attr.lid, gid=str(gid),
                           psn=int.from_bytes(os.urandom(3), "little"))
        self._mrs = []

    def connect(self, remote: QpInfo) -> None:
        from pyverbs.addr import AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        e = self._e
        attr = QPAttr(qp_state=e.IBV_QPS_INIT, port_num=self._device.port)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self._qp.to_init(attr)
        attr = QPAttr(qp_state=e.IBV_QPS_RTR, path_mtu=e.IBV_MTU_4096)
        attr.dest_qp_num, attr.rq_psn = remote.qp_num, remote.psn
        attr.max_dest_rd_atomic, attr.min_rnr_timer = 1, 12
        route = GlobalRoute(dgid=_gid(remote.gid), sgid_index=self._device.gid_index)
        attr.ah_attr = AHAttr(gr=route, is_global=1, dlid=remote.lid, port_num=self._device.port)
        self._qp.to_rtr(attr)
        attr = QPAttr(qp_state=e.IBV_QPS_RTS)
        attr.sq_psn, attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.max_rd_atomic = self.info.psn, 14, 7, 7, 1
        self._qp.to_rts(attr)

    def register(self, buffer) -> MemoryRegion:
        """Host memory (anything with the buffer protocol), or a CUDA tensor through dma-buf."""
        from pyverbs.mr import MR

        e = self._e
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        if getattr(buffer, "is_cuda", False):
            return self._register_dmabuf(buffer, access)
        view = memoryview(buffer).cast("B")
        mr = MR(self._device.pd, view.nbytes, access)  # pyverbs allocates the (page-aligned) memory itself
        self._mrs.append(mr)
        return MemoryRegion(addr=mr.buf, length=view.nbytes, lkey=mr.lkey, rkey=mr.rkey,
                            buffer=_mr_view(mr, view.nbytes))

    def _register_dmabuf(self, tensor, access) -> MemoryRegion:
        from cuda.bindings import driver
        from pyverbs.providers.mlx5.mlx5dv_dmabuf import Mlx5DmaBufMR

        if not self._device.supports_dmabuf:
            raise VerbsError("GPU memory registration needs dma-buf (mlx5 pyverbs and cuda-python)")
        length = tensor.numel() * tensor.element_size()
        err, fd = driver.cuMemGetHandleForAddressRange(
            tensor.data_ptr(), length, driver.CUmemRangeHandleType.CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise VerbsError(f"CUDA could not export a dma-buf for {length} bytes: {err}")
        mr = Mlx5DmaBufMR(self._device.pd, 0, length, iova=tensor.data_ptr(), fd=fd, access=access)
        self._mrs.append(mr)
        return MemoryRegion(addr=tensor.data_ptr(), length=length, lkey=mr.lkey, rkey=mr.rkey,
                            buffer=memoryview(b""))  # device memory: no host view

    def post_recv(self, wr_id: int) -> None:
        from pyverbs.wr import RecvWR

        self._qp.post_recv(RecvWR(wr_id=wr_id, num_sge=0))

    def post_write_imm(self, wr_id, mr, offset, length, remote_addr, rkey, imm) -> None:
        from pyverbs.wr import SGE, SendWR

        e = self._e
        wr = SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                    sg=[SGE(mr.addr + offset, length, mr.lkey)], send_flags=e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey, remote_addr)
        wr.imm_data = imm
        self._qp.post_send(wr)

    def post_send_imm(self, wr_id, imm) -> None:
        from pyverbs.wr import SendWR

        e = self._e
        wr = SendWR(wr_id=wr_id, opcode=e.IBV_WR_SEND_WITH_IMM, num_sge=0, send_flags=e.IBV_SEND_SIGNALED)
        wr.imm_data = imm
        self._qp.post_send(wr)

    def wait_completions(self, timeout_s: float) -> list[Completion]:
        found = self._poll()
        if found:
            return found
        readable, _, _ = select.select([self._channel.fd], [], [], timeout_s)
        if readable:
            self._channel.get_cq_event(self._cq)
            self._cq.ack_events(1)
            self._cq.req_notify()
        return self._poll()

    def _poll(self) -> list[Completion]:
        e = self._e
        opcodes = {e.IBV_WC_RDMA_WRITE: Opcode.WRITE, e.IBV_WC_SEND: Opcode.SEND,
                   e.IBV_WC_RECV_RDMA_WITH_IMM: Opcode.RECV, e.IBV_WC_RECV: Opcode.RECV}
        found = []
        while True:
            count, wcs = self._cq.poll(16)
            if count <= 0:
                return found
            for wc in wcs[:count]:
                ok = wc.status == e.IBV_WC_SUCCESS
                has_imm = bool(wc.wc_flags & e.IBV_WC_WITH_IMM)
                found.append(Completion(wr_id=wc.wr_id, opcode=opcodes.get(wc.opcode, Opcode.RECV), ok=ok,
                                        imm=wc.imm_data if has_imm else None, byte_len=wc.byte_len,
                                        status="success" if ok else f"wc status {wc.status}"))

    def to_error(self, status: str) -> None:
        from pyverbs.qp import QPAttr

        self._qp.modify(QPAttr(qp_state=self._e.IBV_QPS_ERR), self._e.IBV_QP_STATE)

    def close(self) -> None:
        for resource in (self._qp, *self._mrs, self._cq, self._channel):
            resource.close()
        self._mrs.clear()


def _gid(text: str):
    from pyverbs.addr import GID

    return GID(text)


def _mr_view(mr, length: int) -> memoryview:
    """A writable view of pyverbs-allocated MR memory."""
    import ctypes

    return memoryview((ctypes.c_char * length).from_address(mr.buf)).cast("B")
