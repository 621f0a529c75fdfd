"""``python -m sim experiment=smoke`` from a checkout: the same as ``fedseg-sim experiment=smoke``."""

from fedseg.sim.federated import main

if __name__ == "__main__":
    main()
