"""The VFNet detector: ResNet backbone, FPN, VFNet head."""
from vfnet.model.detector import VFNet
from vfnet.model.head import HeadOutputs

__all__ = ["VFNet", "HeadOutputs"]
