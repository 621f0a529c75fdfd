"""Hardware-aware backbone search: measure candidates on this machine, keep those that fit, pick one."""
