"""Models in and out: mmdetection checkpoint conversion (`mmdet`) and ONNX / torch.export (`export`)."""
