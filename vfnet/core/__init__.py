"""What every area of vfnet uses: config, errors, atomic writes, optional imports, the checkpoint
format and the device rule. Imports nothing from the other areas."""
