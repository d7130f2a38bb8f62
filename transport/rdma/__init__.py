"""RDMA feature transport: the protocol (pure Python) over a thin verbs layer (pyverbs, optional)."""

from transport.rdma.protocol import RdmaFeatureReceiver, RdmaFeatureSender
from transport.rdma.verbs import PyverbsDevice, rdma_unavailable_reason

__all__ = ["PyverbsDevice", "RdmaFeatureReceiver", "RdmaFeatureSender", "rdma_unavailable_reason"]
