"""Ray orchestration of the VFNet engine: distributed training (`orchestration.train`, Ray Train),
sweeps (`orchestration.tune`, Ray Tune) and the workers' input, read from packed Parquet shards
(`orchestration.data`).

This is the only package that imports Ray; every worker runs `vfnet.train.engine.train` with a
`TrainData` source and `Observers` (`vfnet.train.engine`; there is no second training loop).
"""
